"""tile, segment and fseg through `--scheduler` on a real `dask scheduler` + `dask worker` (nanny, daemonic
worker process, default reader threads): the outputs equal those of a local run on the same two real slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import run_cli
from tests.real_cluster import real_cluster
from tests.train_fixtures import save_tiny_vit
from wsiseg.store.masks import MaskStore

CLASSES = ["background", "tumour", "stroma"]
MPP = 4.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("model") / "tiny.pth", CLASSES, MPP)


def _labels(folder: Path) -> np.ndarray:
    return MaskStore.open(folder / "mask.zarr").level(0)[:]


def _table_rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()[1:] if line.strip()]


@pytest.mark.slow
def test_tile_segment_fseg_on_a_real_cluster(samples: dict[str, Path], checkpoint: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from wsiseg.engine.segment import segment_slides
    from wsiseg.fseg.slides import fseg_slides
    from wsiseg.store.tiling import tile_slides

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    slides = [samples["cmu_svs"], samples["cmu_pyramid_tiff"]]
    names = ["cmu_svs", "cmu_pyramid"]

    with real_cluster(tmp_path / "cluster") as address:
        tiled = run_cli("tile", *slides, "--mpp", MPP, "--tile", "128", "--out", tmp_path / "tiles",
                        "--scheduler", address)
        segmented = run_cli("segment", *slides, "--checkpoint", checkpoint, "--out", tmp_path / "seg",
                            "--export", "tiff", "--scheduler", address)
        fsegged = run_cli("fseg", *slides, "--k", "3", "--mpp", MPP, "--window", "64", "--device", "cpu",
                          "--out", tmp_path / "fseg", "--scheduler", address)
    for result in (tiled, segmented, fsegged):
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert [row[:2] for row in _table_rows(result.stdout)] == [["cmu_svs.svs", "done"], ["cmu_pyramid.tif", "done"]]

    tile_slides(slides, tmp_path / "tiles_local", MPP, tile=128, progress=False)
    segment_slides(slides, checkpoint, tmp_path / "seg_local", exports=("tiff",), show_progress=False)
    fseg_slides(slides, tmp_path / "fseg_local", k=3, mpp=MPP, window=64, device="cpu", exports=("tiff",),
                show_progress=False)
    for name in names:
        remote = zarr.open_array(str(tmp_path / "tiles" / f"{name}.zarr" / "0"), mode="r")[:]
        local = zarr.open_array(str(tmp_path / "tiles_local" / f"{name}.zarr" / "0"), mode="r")[:]
        assert np.array_equal(remote, local), name
        assert (remote != 255).any()
        for command in ("seg", "fseg"):
            labels = _labels(tmp_path / command / name)
            assert np.array_equal(labels, _labels(tmp_path / f"{command}_local" / name)), (command, name)
            assert len(np.unique(labels)) > 1
