"""`evaluate_mask`: a mask store against annotated tiles (PNG + slide coordinates) or GeoJSON class polygons."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiseg.engine.evaluate import evaluate_mask
from wsiseg.errors import WsisegError
from wsiseg.export.geojson import write_geojson
from wsiseg.slide.grid import Frame
from wsiseg.store.masks import MaskStore

SLIDE_MPP, MASK_MPP, ORIGIN = 0.5, 2.0, (40, 24)


@pytest.fixture()
def mask(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(4)
    labels = np.zeros((120, 100), np.uint8)
    for _ in range(12):  # blobs of classes 1 and 2
        y, x = rng.integers(0, 110), rng.integers(0, 90)
        labels[y : y + rng.integers(5, 30), x : x + rng.integers(5, 30)] = rng.integers(1, 3)
    path = tmp_path / "mask.zarr"
    store = MaskStore.create(path, Frame(100, 120, MASK_MPP, SLIDE_MPP, ORIGIN), ["background", "tumour", "stroma"],
                             chunk=64)
    store.write_rows(0, labels)
    store.finish()
    return path, labels


def _tile(folder: Path, name: str, labels: np.ndarray, mask_x: int, mask_y: int, size: int, sidecar: bool = True) -> dict:
    """An annotated tile at twice the mask's resolution (1 MPP), cut from `labels` at mask pixel (x, y)."""
    crop = labels[mask_y : mask_y + size, mask_x : mask_x + size]
    tile = np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1)
    Image.fromarray(tile).save(folder / f"{name}.png")
    scale = MASK_MPP / SLIDE_MPP  # slide level-0 px per mask px
    entry = {"x": ORIGIN[0] + mask_x * scale, "y": ORIGIN[1] + mask_y * scale, "mpp": 1.0}
    if sidecar:
        (folder / f"{name}.json").write_text(json.dumps(entry))
    return {**entry, "mask": f"{name}.png"}


def test_annotated_tiles(mask: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, labels = mask
    folder = tmp_path / "tiles"
    folder.mkdir()
    _tile(folder, "a", labels, 10, 20, 40)
    _tile(folder, "b", labels, 50, 60, 45)
    result = evaluate_mask(path, folder)
    assert result["regions"] == 2
    assert result["metrics"]["mdice"] == pytest.approx(1.0) and result["metrics"]["pixel_acc"] == 1.0
    assert result["metrics"]["pixels"] == (80 * 80 + 90 * 90)

    # a wrong annotation: tile b says "stroma" everywhere, and 255 (ignored) in one corner
    wrong = np.full((90, 90), 2, np.uint8)
    wrong[:10, :10] = 255
    Image.fromarray(wrong).save(folder / "b.png")
    confusion = np.asarray(evaluate_mask(path, folder)["confusion"])
    crop = labels[60:105, 50:95]
    expected_b = np.bincount(np.repeat(np.repeat(crop, 2, 0), 2, 1)[10:, :].ravel(), minlength=3)
    corner = np.repeat(np.repeat(crop, 2, 0), 2, 1)[:10, 10:]
    expected_b += np.bincount(corner.ravel(), minlength=3)
    assert confusion[2].tolist() == (expected_b + np.bincount(labels[20:60, 10:50].ravel(), minlength=3)
                                     * 4 * (np.arange(3) == 2)).tolist()


def test_tile_index_and_geojson(mask: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, labels = mask
    folder = tmp_path / "indexed"
    folder.mkdir()
    entries = [_tile(folder, "only", labels, 0, 0, 100, sidecar=False)]
    (folder / "tiles.json").write_text(json.dumps(entries))
    assert evaluate_mask(path, folder)["metrics"]["pixel_acc"] == 1.0

    geojson = write_geojson(MaskStore.open(path), tmp_path / "regions.geojson", simplify=0.0)
    result = evaluate_mask(path, geojson)
    # polygons along the pixel edges contain exactly the pixel centres of their class
    assert result["metrics"]["pixel_acc"] == 1.0 and result["metrics"]["pixels"] == int((labels > 0).sum())


def test_bad_annotations(mask: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = mask
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WsisegError, match="no annotated tiles"):
        evaluate_mask(path, empty)
    foreign = tmp_path / "foreign.geojson"
    foreign.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"classification": {"name": "necrosis"}},
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [50, 0], [50, 50], [0, 0]]]}}]}))
    with pytest.raises(WsisegError, match="necrosis"):
        evaluate_mask(path, foreign)
    with pytest.raises(WsisegError, match="not found"):
        evaluate_mask(path, tmp_path / "missing.geojson")


def test_annotation_pixels_outside_the_mask_are_ignored(mask: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, labels = mask
    folder = tmp_path / "edge"
    folder.mkdir()
    # a 40x40 mask-pixel tile whose right half hangs past the mask's right edge (width 100)
    crop = np.zeros((40, 40), np.uint8)
    crop[:, :20] = labels[0:40, 80:100]
    Image.fromarray(np.repeat(np.repeat(crop, 2, axis=0), 2, axis=1)).save(folder / "edge.png")
    scale = MASK_MPP / SLIDE_MPP
    (folder / "edge.json").write_text(json.dumps({"x": ORIGIN[0] + 80 * scale, "y": ORIGIN[1], "mpp": 1.0}))
    result = evaluate_mask(path, folder)
    assert result["metrics"]["pixels"] == 80 * 40 and result["metrics"]["pixel_acc"] == 1.0

    (folder / "edge.json").write_text(json.dumps({"x": 1e7, "y": 1e7, "mpp": 1.0}))
    with pytest.raises(WsisegError, match="falls on the mask"):
        evaluate_mask(path, folder)


def test_geojson_outside_the_mask_is_an_error(mask: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, _ = mask
    far = tmp_path / "far.geojson"
    far.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"classification": {"name": "tumour"}},
        "geometry": {"type": "Polygon", "coordinates": [[[1e7, 1e7], [1e7 + 40, 1e7], [1e7 + 40, 1e7 + 40], [1e7, 1e7]]]}}]}))
    with pytest.raises(WsisegError, match="falls on the mask"):
        evaluate_mask(path, far)


def test_malformed_annotation_files(mask: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, labels = mask
    sidecars = tmp_path / "sidecars"
    sidecars.mkdir()
    _tile(sidecars, "a", labels, 0, 0, 10)
    (sidecars / "a.json").write_text("{not json")
    with pytest.raises(WsisegError, match=r"a\.json is not valid JSON.*fix"):
        evaluate_mask(path, sidecars)

    indexed = tmp_path / "indexed"
    indexed.mkdir()
    entry = _tile(indexed, "b", labels, 0, 0, 10, sidecar=False)
    (indexed / "tiles.json").write_text(json.dumps([{**entry, "mask": "gone.png"}]))
    with pytest.raises(WsisegError, match=r"gone\.png not found.*tiles\.json"):
        evaluate_mask(path, indexed)
    (indexed / "tiles.json").write_text(json.dumps([{key: entry[key] for key in ("x", "y", "mpp")}]))
    with pytest.raises(WsisegError, match=r"tiles\.json.*\"mask\""):
        evaluate_mask(path, indexed)

    big = tmp_path / "big.geojson"
    big.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"class": 300},
        "geometry": {"type": "Polygon", "coordinates": [[[50, 30], [90, 30], [90, 70], [50, 30]]]}}]}))
    with pytest.raises(WsisegError, match=r"class 300 in big\.geojson.*0\.\.2"):
        evaluate_mask(path, big)


def test_geojson_on_a_coarser_level_of_an_odd_sized_mask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Level L pixels are 2^L mask pixels wide (the pyramid halves rounding up, the traced polygons say so)."""
    import wsiseg.engine.evaluate as evaluate

    rng = np.random.default_rng(7)
    labels = np.kron(rng.integers(0, 3, (66, 76)), np.ones((4, 4), np.int64))[:261, :301].astype(np.uint8)
    path = tmp_path / "odd.zarr"
    store = MaskStore.create(path, Frame(301, 261, MASK_MPP, SLIDE_MPP, ORIGIN), ["background", "tumour", "stroma"])
    store.write_rows(0, labels)
    store.finish()
    assert [store.level(i).shape for i in range(store.num_levels)] == [(261, 301), (131, 151), (66, 76)]
    geojson = write_geojson(store, tmp_path / "level2.geojson", level=2)
    monkeypatch.setattr(evaluate, "MAX_RASTER_PIXELS", 66 * 76)  # too few for level 1: the GeoJSON is read at level 2
    result = evaluate_mask(path, geojson)
    coarse = np.asarray(store.level(2)[:])
    assert result["metrics"]["pixel_acc"] == 1.0 and result["metrics"]["pixels"] == int((coarse > 0).sum())
