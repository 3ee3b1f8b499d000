"""GeoJSON and overlay exports of a mask store: valid polygons with holes, seams dissolved, slide coordinates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import shape

from wsiseg.errors import WsisegError
from wsiseg.export.geojson import class_polygons
from wsiseg.export.mask import export_mask
from wsiseg.store.masks import MaskStore


def _labels() -> np.ndarray:
    labels = np.zeros((90, 70), np.uint8)
    labels[5:60, 5:40] = 1
    labels[15:30, 12:25] = 0  # a hole ...
    labels[18:22, 15:19] = 1  # ... with an island inside
    labels[62:85, 30:65] = 2
    labels[70:75, 40:50] = 1  # class 1 inside class 2: a hole of class 2
    return labels


def _store(path: Path, labels: np.ndarray) -> MaskStore:
    store = MaskStore.create(path, labels.shape[1], labels.shape[0], mpp=2.0, class_names=["bg", "tumour", "stroma"],
                             slide_mpp=0.5, origin=(100, 50), chunk=32)
    store.write_rows(0, labels)
    store.finish()
    return store


def test_band_tracing_equals_whole_tracing() -> None:
    labels = _labels()
    whole = class_polygons(labels, 1, band_rows=1000)
    for band in (1, 7, 16):
        banded = class_polygons(labels, 1, band_rows=band)
        assert banded.is_valid
        assert shapely.symmetric_difference(whole, banded).area == pytest.approx(0, abs=1e-9)
        assert len(banded.geoms) == len(whole.geoms) == 3  # seams dissolved: no extra pieces
    # marching squares cut half-pixel corners, so the area is within a pixel per corner of the count
    assert abs(whole.area - (labels == 1).sum()) < 4


def test_geojson_export(tmp_path: Path) -> None:
    labels = _labels()
    _store(tmp_path / "mask.zarr", labels)
    out = export_mask(tmp_path / "mask.zarr", "geojson")
    assert out == tmp_path / "mask.geojson"
    features = json.loads(out.read_text())["features"]
    by_class: dict[str, list] = {}
    for feature in features:
        geometry = shape(feature["geometry"])
        assert geometry.is_valid and geometry.geom_type == "Polygon"
        by_class.setdefault(feature["properties"]["classification"]["name"], []).append(geometry)
    assert sorted(by_class) == ["stroma", "tumour"]
    assert len(by_class["tumour"]) == 3 and len(by_class["stroma"]) == 1
    assert sum(len(p.interiors) for p in by_class["tumour"]) == 1
    assert len(by_class["stroma"][0].interiors) == 1
    # mask px -> slide level-0 px: x 4 (2.0 / 0.5 MPP), plus the bounds origin
    stroma = by_class["stroma"][0]
    minx, miny, maxx, maxy = stroma.bounds
    assert minx == pytest.approx(100 + 30 * 4, abs=2.5) and maxx == pytest.approx(100 + 65 * 4, abs=2.5)
    assert miny == pytest.approx(50 + 62 * 4, abs=2.5) and maxy == pytest.approx(50 + 85 * 4, abs=2.5)
    assert stroma.area == pytest.approx(((labels == 2).sum()) * 16, rel=0.03)
    with pytest.raises(WsisegError, match="already exists"):
        export_mask(tmp_path / "mask.zarr", "geojson")


def test_overlay_and_tiff_exports(tmp_path: Path) -> None:
    import openslide

    labels = _labels()
    _store(tmp_path / "mask.zarr", labels)
    png = export_mask(tmp_path / "mask.zarr", "png", tmp_path / "o.png")
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] >= 90 and image.shape[1] > 70  # the mask plus a legend on its right
    tif = export_mask(tmp_path / "mask.zarr", "tiff")
    with openslide.OpenSlide(str(tif)) as slide:
        assert slide.dimensions == (256, 256)  # padded to one whole tile
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(2.0)
    with pytest.raises(WsisegError, match="format"):
        export_mask(tmp_path / "mask.zarr", "jpeg")
