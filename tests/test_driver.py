"""The multi-slide driver: one naming rule, results in slide order, skip-errors, the summary table."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsiseg.driver import SlideResult, check_results, run_slides, slide_name, slide_outputs, summary_table
from wsiseg.errors import WsisegError


@pytest.mark.parametrize(("path", "name"), [
    ("a/b/cmu.svs", "cmu"), ("x.ome.tiff", "x"), ("X.OME.TIF", "X"), ("tiles/cmu_svs.zarr", "cmu_svs"),
    ("scan.2024.ndpi", "scan.2024"), ("folder", "folder"),
])
def test_slide_name(path: str, name: str) -> None:
    assert slide_name(Path(path)) == name


def test_one_naming_rule(tmp_path: Path) -> None:
    assert slide_outputs([Path("a.svs")], tmp_path) == [tmp_path]
    assert slide_outputs([Path("a.svs"), Path("b.tif")], tmp_path) == [tmp_path / "a", tmp_path / "b"]
    assert slide_outputs([Path("a.svs")], tmp_path, ".zarr") == [tmp_path / "a.zarr"]
    assert slide_outputs([Path("a.svs")], tmp_path / "s.zarr", ".zarr") == [tmp_path / "s.zarr"]
    with pytest.raises(WsisegError, match="both be written to .*a: rename one"):
        slide_outputs([Path("x/a.svs"), Path("y/a.tif")], tmp_path)
    with pytest.raises(WsisegError, match="names one output but 2 slides"):
        slide_outputs([Path("a.svs"), Path("b.svs")], tmp_path / "s.zarr", ".zarr")


def test_run_slides_in_order_with_skip_errors(tmp_path: Path) -> None:
    def work(slide: Path, out: Path) -> SlideResult:
        if slide.name == "bad.svs":
            raise WsisegError("bad.svs is corrupt: re-export it")
        return SlideResult(slide, out, "done", (10, 20), 3, 1.5)

    slides = [Path("a.svs"), Path("bad.svs"), Path("c.svs")]
    outputs = slide_outputs(slides, tmp_path)
    with pytest.raises(WsisegError, match="corrupt"):
        run_slides(slides, outputs, work)
    results = run_slides(slides, outputs, work, skip_errors=True)
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert results[1].message == "bad.svs is corrupt: re-export it" and results[2].out == tmp_path / "c"
    table = summary_table(results, "tiles").splitlines()
    assert table[0].split() == ["slide", "status", "size", "tiles", "tiles/s", "seconds", "output", "/", "error"]
    assert table[1].split()[:5] == ["a.svs", "done", "10x20", "3", "1.5"]
    assert table[2].split()[:2] == ["bad.svs", "failed"] and table[2].endswith("bad.svs is corrupt: re-export it")
    with pytest.raises(WsisegError, match="1 of 3 slides failed.*finished slides are skipped"):
        check_results(results)
