"""Frames (slide coordinates to image pixels and back) and integer window grids: positions, clamping, overlap
and tissue selection."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pytest

from tests.test_slide_reader import openslide_on_white
from wsiseg.errors import WsisegError
from wsiseg.slide import open_slide
from wsiseg.slide.backends import OpenSlideBackend
from wsiseg.slide.grid import Frame, Grid
from wsiseg.slide.tissue import TissueMask, load_mask
from wsiseg.store.masks import MaskStore, level_shapes


def test_positions_step_by_stride_and_clamp_the_last():
    grid = Grid(1000, 600, 256, 256)
    assert grid.xs == [0, 256, 512, 744]
    assert grid.ys == [0, 256, 344]
    assert grid.shape == (3, 4) and len(grid) == 12
    assert grid.positions()[:5] == [(0, 0), (256, 0), (512, 0), (744, 0), (0, 256)]
    assert all(x + 256 <= 1000 and y + 256 <= 600 for x, y in grid.positions())


def test_exact_fit_has_no_duplicate_and_small_image_one_window():
    assert Grid(768, 512, 256, 256).xs == [0, 256, 512]
    assert Grid(100, 80, 256, 128).positions() == [(0, 0)]


def test_unclamped_grid_is_the_chunk_grid():
    grid = Grid(1000, 600, 256, 256, clamp=False)
    assert grid.xs == [0, 256, 512, 768]
    assert grid.size(768, 512) == (232, 88)


def test_from_overlap():
    grid = Grid.from_overlap(1000, 1000, 224, 0.25)
    assert grid.stride == 224 - 56
    assert grid.xs[:3] == [0, 168, 336] and grid.xs[-1] == 1000 - 224
    with pytest.raises(WsisegError):
        Grid.from_overlap(1000, 1000, 224, 1.0)
    with pytest.raises(WsisegError):
        Grid(0, 10, 4, 4)


def test_tissue_positions_follow_the_mask_at_any_mpp():
    mask = np.zeros((100, 100), bool)
    mask[60:70, 10:20] = True  # tissue at 4 um/px: x 40..80 um, y 240..280 um
    tissue = TissueMask(mask, 4.0)
    grid = Grid(800, 800, 100, 100, clamp=False)  # image at 0.5 um/px: 400 um wide
    selected = grid.tissue_positions(tissue, 0.5)
    # tissue spans x 80..160 px and y 480..560 px of the image at 0.5 um/px
    assert selected == [(0, 400), (100, 400), (0, 500), (100, 500)]
    assert tissue.covers(80, 480, 1, 1, 0.5) and not tissue.covers(200, 480, 50, 50, 0.5)


# An MRXS-style non-empty region on the CMU slide, given as OpenSlide gives it: the bounds properties.
BOUNDS = {"openslide.bounds-x": "300", "openslide.bounds-y": "200", "openslide.bounds-width": "1500",
          "openslide.bounds-height": "2000"}


@pytest.fixture()
def offset_cmu(samples):
    """The real CMU slide, read through OpenSlide with bounds properties added."""
    backend = OpenSlideBackend(samples["cmu_svs"])
    backend.properties = {**backend.properties, **BOUNDS}
    slide = open_slide(samples["cmu_svs"])
    slide._backend = backend
    yield slide
    slide.close()


def test_frame_of_a_slide_follows_openslide_bounds_offset(samples, offset_cmu):
    with openslide.OpenSlide(str(samples["cmu_svs"])) as reference:
        mpp0 = (float(reference.properties["openslide.mpp-x"]) + float(reference.properties["openslide.mpp-y"])) / 2
    base = offset_cmu.frame()
    assert base == Frame(1500, 2000, mpp0, mpp0, (300, 200))
    # level-0 pixel (x, y) of the slide's image is OpenSlide's pixel at the bounds origin + (x, y)
    assert base.to_slide(40, 25) == (340, 225)
    assert np.array_equal(offset_cmu.read(40, 25, 64, 48, mpp0), openslide_on_white(samples["cmu_svs"], 340, 225, 64, 48))
    # at 2 MPP: sizes round half up from bounds x slide MPP / MPP, pixels 2 / mpp0 level-0 pixels wide
    frame = offset_cmu.frame(2.0)
    assert frame.size == (int(1500 * mpp0 / 2.0 + 0.5), int(2000 * mpp0 / 2.0 + 0.5)) == offset_cmu.size_at(2.0)
    x, y = frame.to_slide(10.5, 20.5)
    assert x == pytest.approx(300 + 10.5 * 2.0 / mpp0) and y == pytest.approx(200 + 20.5 * 2.0 / mpp0)
    assert frame.origin_um == pytest.approx((300 * mpp0, 200 * mpp0))
    assert base.at(2.0) == frame


def test_frame_round_trips_and_pyramid_levels():
    frame = Frame(1111, 777, 2.0, 0.2527, (1234, 567))
    rng = np.random.default_rng(3)
    xs, ys = rng.uniform(-50, 1200, 500), rng.uniform(-50, 800, 500)
    back = frame.from_slide(*frame.to_slide(xs, ys))
    assert np.allclose(back[0], xs, rtol=0, atol=1e-9) and np.allclose(back[1], ys, rtol=0, atol=1e-9)
    sx, sy = frame.to_slide(xs, ys)
    assert np.allclose(sx, 1234 + xs * 2.0 / 0.2527) and np.allclose(sy, 567 + ys * 2.0 / 0.2527)
    # level L pixel (c, r) starts where level-0 pixel (c 2^L, r 2^L) does; sizes are the stores' level shapes
    for index, shape in enumerate(level_shapes(frame.height, frame.width)):
        level = frame.level(index)
        assert (level.height, level.width) == shape and level.mpp == 2.0 * 2**index
        assert np.allclose(level.to_slide(xs, ys), frame.to_slide(xs * 2**index, ys * 2**index))


def test_mask_store_and_tissue_mask_use_the_frame(tmp_path, offset_cmu):
    frame = Frame(300, 200, 2.0, 0.499, (300, 200))
    store = MaskStore.create(tmp_path / "mask.zarr", frame, ["bg", "tissue"], source="cmu.svs")
    assert MaskStore.open(store.path).frame == frame
    # a square drawn in slide coordinates lands on the mask pixels at (slide - bounds origin) / (4 MPP / slide MPP)
    mpp0 = offset_cmu.mpp
    step = 4.0 / mpp0
    ring = [[300 + c * step, 200 + r * step] for c, r in ((10.5, 20.5), (49.5, 20.5), (49.5, 39.5), (10.5, 39.5))]
    (tmp_path / "square.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [ring + ring[:1]]}))
    tissue = load_mask(tmp_path / "square.geojson", offset_cmu.frame(), mask_mpp=4.0)
    assert tissue.mpp == 4.0 and tissue.shape == (int(2000 * mpp0 / 4.0 + 0.5), int(1500 * mpp0 / 4.0 + 0.5))
    assert np.array_equal(np.argwhere(tissue.mask)[[0, -1]], [[21, 11], [39, 49]])
    assert tissue.mask.sum() == 19 * 39
