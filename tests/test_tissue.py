"""Tissue detection on the real CMU slide, user masks (PNG, GeoJSON) and the QC picture."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from wsiseg.errors import WsisegError
from wsiseg.slide import open_slide
from wsiseg.slide.tissue import detect_tissue, load_mask, qc_picture, tissue_mask


@pytest.fixture(scope="module")
def cmu(samples):
    with open_slide(samples["cmu_svs"]) as slide:
        yield slide


def test_detects_the_cmu_tissue(cmu):
    tissue = tissue_mask(cmu)
    assert tissue.mpp == 4.0
    assert tissue.shape == (370, 277)
    assert 0.25 < tissue.fraction < 0.5  # the sample is about half background
    # the left margin of the slide is glass, the lower middle is tissue
    assert not tissue.covers(0, 0, 100, 2900, 0.499)
    assert tissue.covers(1100, 2500, 64, 64, 0.499)


def test_blank_image_has_no_tissue_and_parameters_matter(cmu):
    assert not detect_tissue(np.full((200, 200, 3), 245, np.uint8)).any()
    glass = cmu.read(20, 40, 150, 190, 2.0)  # real background of the slide, left of the tissue
    assert not detect_tissue(glass).any()
    thumbnail = cmu.thumbnail(400)
    loose = detect_tissue(thumbnail, min_area_px=1, fill_holes=False)
    strict = detect_tissue(thumbnail, threshold=0.3)
    assert strict.sum() < loose.sum()


def test_png_mask_replaces_detection(cmu, tmp_path):
    mask = np.zeros((297, 222), np.uint8)  # a tenth of the slide size
    mask[:100, :100] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    tissue = load_mask(tmp_path / "mask.png", cmu)
    assert tissue.mpp == pytest.approx(4.99)
    assert tissue.covers(0, 0, 10, 10, 0.499) and not tissue.covers(1500, 1500, 10, 10, 0.499)
    Image.fromarray(np.zeros((100, 300), np.uint8)).save(tmp_path / "wrong.png")
    with pytest.raises(WsisegError, match="aspect"):
        load_mask(tmp_path / "wrong.png", cmu)


def test_geojson_polygons_with_holes(cmu, tmp_path):
    square = [[1000, 1000], [2000, 1000], [2000, 2000], [1000, 2000], [1000, 1000]]
    hole = [[1400, 1400], [1600, 1400], [1600, 1600], [1400, 1600], [1400, 1400]]
    geojson = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [square, hole]}},
    ]}
    (tmp_path / "tissue.geojson").write_text(json.dumps(geojson))
    tissue = load_mask(tmp_path / "tissue.geojson", cmu)
    assert tissue.covers(1100, 1100, 10, 10, 0.499)
    assert not tissue.covers(1480, 1480, 40, 40, 0.499)  # inside the hole
    assert not tissue.covers(100, 100, 500, 500, 0.499)
    (tmp_path / "points.geojson").write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    with pytest.raises(WsisegError, match="no Polygon"):
        load_mask(tmp_path / "points.geojson", cmu)


def test_qc_picture_draws_outline_and_tiles(cmu):
    tissue = tissue_mask(cmu)
    thumbnail = cmu.thumbnail(512)
    picture = qc_picture(thumbnail, tissue, [(1024, 1024)], 512, 2216)
    assert picture.shape == thumbnail.shape
    green = (picture == (0, 200, 0)).all(axis=2).sum()
    blue = (picture == (30, 60, 220)).all(axis=2).sum()
    assert green > 200 and blue > 100


def test_sample_rows_is_the_nearest_mask_pixel(cmu):
    """Rows of the mask on an image grid equal a direct nearest lookup of every pixel centre."""
    tissue = tissue_mask(cmu)
    for y0, rows, width, mpp in [(0, 50, 300, 2.0), (123, 77, 2216, 0.5), (2900, 61, 2216, 0.5)]:
        factor = mpp / tissue.mpp
        ys = np.minimum(((np.arange(y0, y0 + rows) + 0.5) * factor).astype(int), tissue.mask.shape[0] - 1)
        xs = np.minimum(((np.arange(width) + 0.5) * factor).astype(int), tissue.mask.shape[1] - 1)
        expected = np.array([[tissue.mask[y, x] for x in xs] for y in ys])
        assert np.array_equal(tissue.sample_rows(y0, rows, width, mpp), expected)
