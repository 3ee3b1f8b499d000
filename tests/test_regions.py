"""Resize mode on a tile store: large regions read from the store's pyramid, bounded by the window."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wsiseg.engine import regions
from wsiseg.engine.run import run_slide
from wsiseg.store.masks import MaskStore, level_shapes
from wsiseg.store.tiles import TileStore, mean_downsample
from wsiseg.store.tiling import tile_slide

MPP, WINDOW = 0.5, 256
READ_REGION = regions.read_region


class ColourPredictor:
    """Scores from the brightness of each pixel's 5 x 5 neighbourhood alone (background: bright, nuclei: dark,
    stroma: between), so the labels follow the pixels the model is given, at the resolution it is given them."""

    num_outputs, class_names, colors, input_multiple = 3, ["background", "nuclei", "stroma"], None, 16

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        brightness = torch.nn.functional.avg_pool2d(batch.mean(1, keepdim=True), 5, 1, 2, count_include_pad=False)[:, 0]
        logits = torch.stack([20 * (brightness - 0.82), 20 * (0.62 - brightness), torch.zeros_like(brightness)], 1)
        return logits.softmax(1)


@pytest.fixture(scope="module")
def store(samples: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> TileStore:
    """The CMU slide tiled at its base MPP, with its pyramid."""
    return tile_slide(samples["cmu_svs"], tmp_path_factory.mktemp("store") / "cmu.zarr", MPP, tile=256, workers=0,
                      progress=False)


def without_levels(store: TileStore, path: Path, first: int) -> TileStore:
    """A copy of `store` whose pyramid levels from `first` on are gone (1: a store tiled before pyramids)."""
    shutil.copytree(store.path, path)
    for level in range(first, 32):
        shutil.rmtree(path / str(level), ignore_errors=True)
    return TileStore(path)


def segment(source: object, out: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Labels of a resize run at (MPP, WINDOW) and the shapes of the pixels read for its regions."""
    shapes: list[tuple[int, ...]] = []

    def read_region(*args: object) -> np.ndarray:
        pixels = READ_REGION(*args)
        shapes.append(pixels.shape)
        return pixels

    monkeypatch.setattr(regions, "read_region", read_region)
    run_slide(source, ColourPredictor(), out, mpp=MPP, window=WINDOW, mode="resize", workers=0, exports=(),
              show_progress=False)
    return MaskStore.open(out / "mask.zarr").level(0)[:], shapes


def test_coarse_reads_come_from_the_coarsest_level_at_least_as_fine(store: TileStore, tmp_path: Path) -> None:
    box = store.read(400, 600, 1024, 768)
    level1 = mean_downsample(box.transpose(2, 0, 1)).transpose(1, 2, 0)
    assert np.array_equal(store.read_coarse(400, 600, 1024, 768, 1.0), box)
    assert np.array_equal(store.read_coarse(400, 600, 1024, 768, 3.9), level1)  # 2 <= 3.9 < 4
    level2 = mean_downsample(level1.transpose(2, 0, 1)).transpose(1, 2, 0)
    assert np.array_equal(store.read_coarse(400, 600, 1024, 768, 4.0), level2)
    top = 2 ** (len(level_shapes(store.height, store.width)) - 1)  # as coarse as the pyramid goes
    assert store.read_coarse(400, 600, 1024, 768, 1000.0).shape == (768 // top, 1024 // top, 3)
    assert np.array_equal(without_levels(store, tmp_path / "one.zarr", 2).read_coarse(400, 600, 1024, 768, 6), level1)
    assert np.array_equal(without_levels(store, tmp_path / "none.zarr", 1).read_coarse(400, 600, 1024, 768, 6), box)


def test_store_regions_are_read_within_twice_the_window(samples: dict[str, Path], store: TileStore, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from_slide, slide_reads = segment(samples["cmu_svs"], tmp_path / "slide", monkeypatch)
    from_store, store_reads = segment(store, tmp_path / "store", monkeypatch)
    old_store, full_reads = segment(without_levels(store, tmp_path / "old.zarr", 1), tmp_path / "old", monkeypatch)
    assert len(store_reads) == len(full_reads) == len(slide_reads) >= 1
    assert max(max(shape[:2]) for shape in full_reads) > 4 * WINDOW  # the regions are large: read whole without levels
    assert all(max(shape[:2]) <= 2 * WINDOW for shape in store_reads)
    assert all(read == full for read, full in zip(store_reads, full_reads) if max(full[:2]) <= WINDOW)  # as before
    assert from_store.shape == from_slide.shape == old_store.shape
    foreground = (from_slide != 0) | (from_store != 0)
    assert len(np.unique(from_slide[foreground])) == 3  # the labels follow the pixels, not a constant
    agreement = (from_store == from_slide)[foreground].mean()  # 0.96 measured, the full-size read's 0.96 too
    assert agreement > 0.9 and agreement > (old_store == from_slide)[foreground].mean() - 0.02
    assert (from_store == old_store)[foreground].mean() > 0.9
    fingerprint = {name: json.loads((tmp_path / name / "summary.json").read_text())["fingerprint"]
                   for name in ("slide", "store")}
    assert fingerprint["store"]["store_read"] == "pyramid"  # a store's earlier resize runs are not resumed
    assert "store_read" not in fingerprint["slide"]
