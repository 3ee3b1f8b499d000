"""Tissue detection on the real CMU slide, user masks (PNG, GeoJSON) and the QC picture."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import color

from wsiseg.errors import WsisegError
from wsiseg.slide import open_slide
from wsiseg.slide.tissue import (
    TissueSettings, check_tissue_option, detect_tissue, load_mask, qc_picture, resolve_source_tissue, resolve_tissue,
    tissue_mask,
)


@pytest.fixture(scope="module")
def cmu(samples):
    with open_slide(samples["cmu_svs"]) as slide:
        yield slide


# Places on the CMU slide (level-0 pixels, 0.499 MPP), found by looking at its QC picture.
STRAND = (170, 990, 620, 230)  # x, y, w, h: the thin strand with nuclei reaching out left at mid-height
FRAGMENTS = [(0, 60, 90, 90), (2060, 560, 150, 110)]  # small pieces near the top-left corner and the right edge


def test_detects_the_cmu_tissue_at_a_fine_resolution(cmu):
    tissue = tissue_mask(cmu)
    assert tissue.mpp == pytest.approx(2967 * 0.499 / 1024)  # 1024 px along the longer side, finer than 2 MPP
    assert tissue.shape == (1024, 766)
    assert 0.3 < tissue.fraction < 0.5  # the sample is about half background
    assert not tissue.covers(0, 1300, 250, 1600, 0.499)  # the left margin, below the strand, is glass
    assert tissue.covers(1100, 2500, 64, 64, 0.499)


def test_keeps_the_thin_strand_and_the_small_fragments(cmu):
    tissue = tissue_mask(cmu)
    x, y, w, h = STRAND
    # nuclei of the strand, found at full resolution by colour deconvolution (skimage), must be in the mask
    nuclei = color.rgb2hed(cmu.read(x, y, w, h, 0.499))[..., 0] > 0.08
    assert nuclei.sum() > 500
    inside = tissue.sample_rows(y, h, x + w, 0.499)[:, x:]
    assert inside[nuclei].mean() > 0.95
    for box in FRAGMENTS:
        assert tissue.covers(*box, 0.499)


@pytest.mark.parametrize("side", [224, 256, 288, 448, 512])
def test_an_image_without_background_is_all_tissue(samples, side):
    """Patches and ROIs: all-tissue crops of the real H&E image, at 0.25 and 0.5 MPP (every side)."""
    image = np.asarray(Image.open(samples["hgsc_image"]).convert("RGB"))
    for x, y in ((600, 600), (1000, 1000), (300, 100)):
        crop = image[y : y + side, x : x + side]
        for mpp in (0.25, 0.5):
            mask = detect_tissue(crop, mpp)
            assert mask.mean() > 0.98, (side, x, y, mpp, mask.mean())


def test_a_crop_keeps_the_tissue_edge_the_slide_mask_has(cmu):
    """Detection on a crop agrees with the whole slide's mask there: no edge eaten by a coarse mask."""
    slide_mask = tissue_mask(cmu)
    x, y, side = 520, 1900, 448  # across the left tissue border
    crop = cmu.read(x, y, side, side, 0.499)
    own = detect_tissue(crop, 0.499)
    reference = slide_mask.sample_rows(y, side, x + side, 0.499)[:, x:]
    assert 0.3 < reference.mean() < 0.9
    assert (own == reference).mean() > 0.97


@pytest.mark.slow
def test_small_fragments_on_a_large_slide_are_kept_only_with_nuclei(cmu):
    """A mosaic: real 30 um fragments pasted far apart on a 1.5 mm canvas of white, and eosin-only copies."""
    canvas = np.full((3000, 3000, 3), 244, np.uint8)
    piece = cmu.read(1150, 2300, 60, 60, 0.499)  # epidermis: nuclei
    assert (color.rgb2hed(piece)[..., 0] > 0.08).mean() > 0.05
    eosin = np.full_like(piece, (235, 150, 190))  # saturated like tissue, no haematoxylin
    for index in range(4):
        canvas[300 + 600 * index : 360 + 600 * index, 300:360] = piece
        canvas[300 + 600 * index : 360 + 600 * index, 2000:2060] = eosin
    mask = detect_tissue(canvas, 0.5)
    for index in range(4):
        assert mask[300 + 600 * index : 360 + 600 * index, 300:360].mean() > 0.9
        assert not mask[300 + 600 * index : 360 + 600 * index, 1900:2200].any()
    big_eosin = canvas.copy()
    big_eosin[100:300, 2400:2600] = (235, 150, 190)  # 100 um square: above the minimum area
    assert detect_tissue(big_eosin, 0.5)[150:250, 2450:2550].all()


def test_blank_image_has_no_tissue_and_parameters_matter(cmu):
    assert not detect_tissue(np.full((200, 200, 3), 245, np.uint8), 2.0).any()
    glass = cmu.read(20, 400, 150, 190, 2.0)  # real background of the slide, left of the tissue
    assert not detect_tissue(glass, 2.0).any()
    thumbnail = cmu.read_whole(8.0)
    default = detect_tissue(thumbnail, 4.0)
    strict = detect_tissue(thumbnail, 4.0, TissueSettings(threshold=0.4))
    no_small = detect_tissue(thumbnail, 4.0, TissueSettings(min_area_um2=50_000, min_fragment_um2=50_000))
    assert strict.sum() < default.sum() and no_small.sum() < default.sum()


def test_tissue_option_auto_all_or_a_mask(cmu, tmp_path):
    assert check_tissue_option(None) == "auto" and check_tissue_option("all") == "all"
    with pytest.raises(WsisegError, match="auto .* all .* mask"):
        check_tissue_option("everything")
    with pytest.raises(WsisegError, match="no such tissue mask"):
        check_tissue_option(tmp_path / "missing.png")
    everything, source = resolve_tissue("all", cmu)
    assert source == "all" and everything.fraction == 1.0
    assert everything.covers(0, 0, 1, 1, 0.499)
    mask = np.zeros((297, 222), np.uint8)
    mask[:100, :100] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    loaded, source = resolve_tissue(tmp_path / "mask.png", cmu)
    assert source == str((tmp_path / "mask.png").resolve()) and 0.1 < loaded.fraction < 0.2


def test_png_mask_replaces_detection(cmu, tmp_path):
    mask = np.zeros((297, 222), np.uint8)  # a tenth of the slide size
    mask[:100, :100] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    tissue = load_mask(tmp_path / "mask.png", cmu.frame())
    assert tissue.mpp == pytest.approx(4.99)
    assert tissue.covers(0, 0, 10, 10, 0.499) and not tissue.covers(1500, 1500, 10, 10, 0.499)
    Image.fromarray(np.zeros((100, 300), np.uint8)).save(tmp_path / "wrong.png")
    with pytest.raises(WsisegError, match="aspect"):
        load_mask(tmp_path / "wrong.png", cmu.frame())


def test_geojson_polygons_with_holes(cmu, tmp_path):
    square = [[1000, 1000], [2000, 1000], [2000, 2000], [1000, 2000], [1000, 1000]]
    hole = [[1400, 1400], [1600, 1400], [1600, 1600], [1400, 1600], [1400, 1400]]
    geojson = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [square, hole]}},
    ]}
    (tmp_path / "tissue.geojson").write_text(json.dumps(geojson))
    tissue = load_mask(tmp_path / "tissue.geojson", cmu.frame())
    assert tissue.covers(1100, 1100, 10, 10, 0.499)
    assert not tissue.covers(1480, 1480, 40, 40, 0.499)  # inside the hole
    assert not tissue.covers(100, 100, 500, 500, 0.499)
    (tmp_path / "points.geojson").write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    with pytest.raises(WsisegError, match="no Polygon"):
        load_mask(tmp_path / "points.geojson", cmu.frame())


def test_a_tile_store_reads_masks_over_its_slide(cmu, samples, tmp_path):
    from wsiseg.store.tiling import tile_slide

    store = tile_slide(samples["cmu_svs"], tmp_path / "cmu.zarr", 8.0, tile=64, workers=0, progress=False)
    assert store.slide_frame == cmu.frame()
    square = [[1000, 1000], [2000, 1000], [2000, 2000], [1000, 2000], [1000, 1000]]
    (tmp_path / "tissue.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [square]}))
    for option in ("all", tmp_path / "tissue.geojson"):
        from_store, from_slide = resolve_source_tissue(option, store, True), resolve_source_tissue(option, cmu, False)
        assert from_store.mpp == from_slide.mpp and np.array_equal(from_store.mask, from_slide.mask)
        assert from_store.fraction == (1.0 if option == "all" else pytest.approx(1000 * 1000 / (2220 * 2967), rel=0.05))
    assert np.array_equal(resolve_source_tissue("auto", store, True).mask, store.tissue.mask)


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
