"""MaskStore: OME-Zarr 0.5 label pyramid by mode downsampling, written in stripes, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr

from tests.ome_zarr_check import validate
from wsiseg.slide.grid import Frame
from wsiseg.store.masks import PROGRESS_FILE, MaskStore, class_counts, level_shapes, mode_downsample


def _brute_mode(labels: np.ndarray) -> np.ndarray:
    padded = np.pad(labels, ((0, labels.shape[0] % 2), (0, labels.shape[1] % 2)), mode="edge")
    out = np.zeros((padded.shape[0] // 2, padded.shape[1] // 2), labels.dtype)
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            block = [padded[2 * r, 2 * c], padded[2 * r, 2 * c + 1], padded[2 * r + 1, 2 * c], padded[2 * r + 1, 2 * c + 1]]
            counts = [block.count(v) for v in block]
            out[r, c] = block[int(np.argmax(counts))]  # first most frequent in block order
    return out


def test_mode_downsample_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    for shape in ((8, 10), (7, 9), (1, 5)):
        labels = rng.integers(0, 4, shape).astype(np.uint8)
        assert np.array_equal(mode_downsample(labels), _brute_mode(labels))
    assert level_shapes(740, 554) == [(740, 554), (370, 277), (185, 139), (93, 70)]


def _create(path: Path, params: dict, height: int = 300, width: int = 170) -> MaskStore:
    return MaskStore.resume_or_create(
        path, params, Frame(width, height, 2.0, 0.5, (10, 20)), class_names=["background", "tumour", "stroma"],
        source="/slides/a.svs", probabilities=True, chunk=64,
    )


def test_write_in_stripes_resume_and_pyramid(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, (300, 170))
    probs = rng.random((3, 300, 170)).astype(np.float32)
    path = tmp_path / "mask.zarr"
    store = _create(path, {"run": 1})
    y = 0
    for rows in (10, 50, 7, 90):  # uneven stripes; only whole chunk rows reach the disk
        store.write_rows(y, labels[y : y + rows], probs[:, y : y + rows])
        y += rows
    assert store.rows_done == 128
    assert json.loads((path / PROGRESS_FILE).read_text())["rows_done"] == 128

    # an interrupted run: reopened with the same settings it continues at row 128 ...
    store = _create(path, {"run": 1})
    assert store.rows_done == 128 and not store.is_complete
    for y0 in range(128, 300, 40):
        store.write_rows(y0, labels[y0 : y0 + 40], probs[:, y0 : y0 + 40])
    store.finish()
    assert not (path / PROGRESS_FILE).exists()

    done = MaskStore.open(path)
    assert done.is_complete and done.num_levels == 3
    assert np.array_equal(done.level(0)[:], labels)
    assert np.array_equal(done.level(1)[:], mode_downsample(labels.astype(np.uint8)))
    assert np.array_equal(done.probabilities[:], probs.astype(np.float16))
    counts = np.bincount(labels.ravel(), minlength=3)
    areas = done.class_areas_mm2()
    assert areas["stroma"] == counts[2] * (2.0 / 1000) ** 2
    assert done.origin == (10, 20) and done.slide_mpp == 0.5

    validate(path, "label")  # with its probabilities array beside the levels
    ome = zarr.open_group(str(path), mode="r").attrs["ome"]
    assert ome["version"] == "0.5"
    assert ome["multiscales"][0]["type"] == "mode" and ome["image-label"]["version"] == "0.5"
    # translations in slide micrometres: origin (10, 20) px of 0.5 µm; a level-2 pixel (8 µm) is
    # centred on the four 2 µm pixels it covers, 3 µm past the first one's centre
    datasets = ome["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2"]
    assert datasets[2]["coordinateTransformations"][0]["scale"] == [8.0, 8.0]
    assert datasets[0]["coordinateTransformations"][1]["translation"] == [20 * 0.5, 10 * 0.5]
    assert datasets[2]["coordinateTransformations"][1]["translation"] == [20 * 0.5 + 3.0, 10 * 0.5 + 3.0]
    assert [p["class"] for p in ome["image-label"]["properties"]] == ["background", "tumour", "stroma"]
    assert ome["image-label"]["colors"][0]["rgba"][3] == 0 and ome["image-label"]["colors"][1]["rgba"][3] == 255

    # a finished store left under its partial name is taken as it is ...
    again = _create(path, {"run": 1})
    assert again.is_complete and again.rows_done == 300 and again.pixel_counts == done.pixel_counts
    # ... while different settings start afresh
    fresh = _create(path, {"run": 2})
    assert fresh.rows_done == 0 and not fresh.is_complete


def test_class_counts_equal_bincount() -> None:
    rng = np.random.default_rng(4)
    for classes in (1, 3, 16, 17, 300):
        labels = rng.integers(0, classes, (37, 53)).astype(np.uint8 if classes <= 255 else np.uint16)
        assert class_counts(labels, classes) == np.bincount(labels.ravel(), minlength=classes).tolist()
