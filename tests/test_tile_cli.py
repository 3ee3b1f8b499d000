"""`wsiseg tile` as a user runs it: a good run with its summary, and every bad input as one clear line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import assert_user_error, run_cli
from wsiseg.outputs import partial_path
from wsiseg.store.tiles import TileStore


def nothing_complete(out) -> bool:
    """No store in `out` (a folder or a .zarr path) claims to be complete."""
    candidates = [out] if out.suffix == ".zarr" else list(out.glob("*.zarr")) if out.is_dir() else []
    return not any(path.exists() and TileStore.open(path).is_complete for path in candidates)


def test_tile_command_writes_store_and_summary(samples, tmp_path):
    result = run_cli("tile", samples["cmu_svs"], "--mpp", "2", "--out", tmp_path, "--workers", "0", "--tile", "128")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    summary = lines[next(i for i, line in enumerate(lines) if line.startswith("slide ")) :]
    assert summary[0].split()[:6] == ["slide", "status", "size", "tiles", "tiles/s", "seconds"]
    assert summary[1].split()[:3] == ["cmu_svs.svs", "done", "554x740"]
    store = TileStore.open(tmp_path / "cmu_svs.zarr")
    assert store.is_complete and (store.width, store.height) == (554, 740)

    same = run_cli("tile", samples["cmu_svs"], "--mpp", "2", "--out", tmp_path, "--workers", "0", "--tile", "128")
    assert same.returncode == 0, same.stderr
    assert "skipped" in same.stdout and "finished by an earlier run" in same.stderr
    again = run_cli("tile", samples["cmu_svs"], "--mpp", "2", "--out", tmp_path, "--workers", "0")
    assert_user_error(again, "already exists", "--overwrite")
    assert TileStore.open(tmp_path / "cmu_svs.zarr").is_complete


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing", ("no such",)),
        ("directory", ("folder",)),
        ("not_a_slide", ("not a slide",)),
        ("unreadable_svs", ("corrupt",)),
        ("unopenable_tiff", ("corrupt",)),
        ("no_mpp", ("--slide-mpp",)),
        ("too_fine", ("finer", "--mpp")),
        ("unwritable", ("cannot",)),
    ],
)
def test_bad_input_is_one_clear_line(samples, tmp_path, case, words):
    slide, out, extra = samples["cmu_svs"], tmp_path / "out", []
    if case == "missing":
        slide = tmp_path / "nowhere.svs"
    elif case == "directory":
        slide = tmp_path
    elif case == "not_a_slide":
        slide = samples["efficientnet_lite0_pth"]
    elif case in ("unreadable_svs", "unopenable_tiff"):
        slide = samples[case]
    elif case == "no_mpp":
        slide = samples["hgsc_image"]
    elif case == "too_fine":
        extra = ["--mpp", "0.1"]
    elif case == "unwritable":
        (tmp_path / "file").write_text("a file, not a folder")
        out = tmp_path / "file" / "out"
    result = run_cli("tile", slide, *(extra or ["--mpp", "1"]), "--out", out, "--workers", "0")
    assert_user_error(result, *words)
    assert nothing_complete(out)


def test_skip_errors_goes_on_and_fails_at_the_end(samples, tmp_path):
    result = run_cli(
        "tile", samples["unreadable_svs"], samples["cmu_pyramid_tiff"], "--mpp", "4", "--out", tmp_path,
        "--workers", "0", "--skip-errors",
    )
    assert_user_error(result, "1 of 2 slides failed")
    assert "failed" in result.stdout and "done" in result.stdout
    assert TileStore.open(tmp_path / "cmu_pyramid.zarr").is_complete
    assert not (tmp_path / "unreadable_svs.zarr").exists()


def test_no_tissue_is_a_warning_and_an_empty_store(tmp_path):
    Image.fromarray(np.full((300, 300, 3), 252, np.uint8)).save(tmp_path / "glass.jpg")
    result = run_cli("tile", tmp_path / "glass.jpg", "--mpp", "1", "--slide-mpp", "0.5", "--out",
                     tmp_path / "glass.zarr", "--workers", "0")
    assert result.returncode == 0, result.stderr
    assert "no tissue" in result.stderr and "Traceback" not in result.stderr
    assert "empty" in result.stdout
    store = TileStore.open(tmp_path / "glass.zarr")
    assert store.is_complete and store.tissue_tiles() == []
    assert not partial_path(tmp_path / "glass.zarr").exists()
