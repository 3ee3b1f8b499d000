"""Slide reading on the real sample slides: metadata, geometry at any MPP, formats, bad input."""

from __future__ import annotations

import json
import pickle

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from tests.conftest import assert_user_error, run_cli
from wsiseg.errors import WsisegError
from wsiseg.slide import Bounds, open_slide
from wsiseg.slide.backends import ImageBackend, OpenSlideBackend
from wsiseg.slide.reader import take_rows_columns

CMU_SIZES = {0.25: (4431, 5922), 0.5: (2216, 2961), 1.0: (1108, 1481), 2.0: (554, 740)}


def openslide_on_white(path, x: int, y: int, w: int, h: int) -> np.ndarray:
    """OpenSlide's own read_region at level 0, composited on white with Pillow."""
    with openslide.OpenSlide(str(path)) as slide:
        region = slide.read_region((x, y), 0, (w, h))
    white = Image.new("RGBA", region.size, (255, 255, 255, 255))
    white.alpha_composite(region)
    return np.asarray(white.convert("RGB"))


def test_cmu_metadata(samples):
    with open_slide(samples["cmu_svs"]) as slide:
        assert slide.level_dimensions == [(2220, 2967)]
        assert slide.mpp == pytest.approx(0.499)
        assert slide.objective_power == 20
        assert slide.vendor == "aperio"
        assert slide.format == "openslide:aperio"
        assert slide.bounds == Bounds(0, 0, 2220, 2967)
        assert set(slide.associated_images) == {"label", "macro", "thumbnail"}


@pytest.mark.slow
def test_info_command_reports_size_and_mpp(samples):
    result = run_cli("info", samples["cmu_svs"], "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["levels"][0]["width"], info["levels"][0]["height"]) == (2220, 2967)
    assert info["mpp"] == pytest.approx(0.499)
    assert info["objective_power"] == 20
    text = run_cli("info", samples["cmu_svs"]).stdout
    assert "2220x2967" in text and "0.499" in text


def test_base_read_equals_openslide_and_is_white_outside(samples):
    with open_slide(samples["cmu_svs"]) as slide:
        inside = slide.read(700, 900, 300, 200, 0.499)
        assert np.array_equal(inside, openslide_on_white(samples["cmu_svs"], 700, 900, 300, 200))
        edge = slide.read(2100, 2900, 200, 100, 0.499)
    assert np.array_equal(edge[:67, :120], openslide_on_white(samples["cmu_svs"], 2100, 2900, 120, 67))
    assert (edge[67:] == 255).all() and (edge[:, 120:] == 255).all()


@pytest.mark.parametrize("mpp", sorted(CMU_SIZES))
def test_size_at_mpp_is_round_of_scaled_size(samples, mpp):
    with open_slide(samples["cmu_svs"]) as slide:
        assert slide.size_at(mpp) == CMU_SIZES[mpp]
        width, height = CMU_SIZES[mpp]
        corner = slide.read(width - 10, height - 10, 10, 10, mpp)
        assert corner.shape == (10, 10, 3) and corner.dtype == np.uint8


def test_reads_at_a_reduced_level_use_its_pixels_in_place(samples):
    """At the MPP of pyramid level 1 the read is that level's pixels, wherever the box starts."""
    with openslide.OpenSlide(str(samples["cmu_pyramid_tiff"])) as raw:
        level1 = np.asarray(raw.read_region((0, 0), 1, raw.level_dimensions[1]))[..., :3].astype(int)
    with open_slide(samples["cmu_pyramid_tiff"]) as pyramid:
        mpp = pyramid.mpp * pyramid.level_downsamples[1]
        assert pyramid.best_level(2.0 * 1.0001) == 1 and pyramid.best_level(1.9) == 0
        assert np.array_equal(pyramid.read(0, 0, 256, 256, mpp), level1[:256, :256])
        for x, y in [(640, 640), (301, 907)]:  # textured tissue, away from the origin
            window = pyramid.read(x, y, 128, 128, mpp).astype(int)
            expected = level1[y : y + 128, x : x + 128]
            assert expected.std() > 40
            # OpenSlide interpolates reads that start between level pixels; the position is exact
            assert np.abs(window - expected).mean() < 6
            shifted = level1[y + 1 : y + 129, x + 1 : x + 129]
            assert np.abs(window - expected).mean() < np.abs(window - shifted).mean() / 3


def test_reads_near_a_level_mpp_take_its_nearest_pixels(samples):
    """At 0.5 MPP on the 0.499 MPP slide each output pixel is the base pixel under its centre: no filter."""
    width, height = 2220, 2967
    base = openslide_on_white(samples["cmu_svs"], 0, 0, width + 64, height + 64)  # white past the edges
    scale = 0.5 / 0.499
    with open_slide(samples["cmu_svs"]) as slide:
        assert slide.mpp == 0.499
        for x, y, w, h in [(700, 900, 300, 200), (0, 0, 64, 48), (2150, 2900, 70, 64), (-5, 30, 20, 20)]:
            rows = np.floor((y + np.arange(h) + 0.5) * scale).astype(int)
            cols = np.floor((x + np.arange(w) + 0.5) * scale).astype(int)
            expected = base[np.ix_(rows, cols)] if x >= 0 else None
            window = slide.read(x, y, w, h, 0.5)
            if expected is None:  # left of the slide: white, then the base pixels
                assert (window[:, :5] == 255).all()
                assert np.array_equal(window[:, 5:], base[np.ix_(rows, cols[5:])])
            else:
                assert np.array_equal(window, expected)
    skipped = np.diff(np.floor((700 + np.arange(300) + 0.5) * scale))
    assert set(skipped) == {1, 2}  # the first window really is rescaled: a column is skipped


def reads_of(backend):
    """Record the boxes `backend.read` is asked for (level, x, y, w, h)."""
    boxes, read = [], backend.read

    def recorded(*box):
        boxes.append(box)
        return read(*box)

    backend.read = recorded
    return boxes


def test_read_near_a_level_mpp_covers_only_the_pixels_it_takes(samples):
    """On level 0 (no sub-pixel offset) the read box holds just the base pixels taken: no margin column
    or row, which could cost the decoding of one more tile column or row."""
    scale = 0.5 / 0.499
    base = openslide_on_white(samples["cmu_svs"], 0, 0, 2220, 2967)
    with open_slide(samples["cmu_svs"]) as slide:
        boxes = reads_of(slide.backend)
        for x, y in [(700, 900), (1003, 1500), (0, 0)]:
            rows = np.floor((y + np.arange(512) + 0.5) * scale).astype(int)
            cols = np.floor((x + np.arange(512) + 0.5) * scale).astype(int)
            assert np.array_equal(slide.read(x, y, 512, 512, 0.5), base[np.ix_(rows, cols)])
            assert boxes[-1] == (0, cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)


@pytest.mark.parametrize("pillow", [False, True], ids=["numpy", "pillow-fallback"])
def test_openslide_reads_equal_plain_read_region(samples, monkeypatch, pillow):
    """The backend's RGB is OpenSlide's read_region without its alpha, on the real CMU sample, through the
    numpy path (decoded straight into an array) and through the Pillow fallback."""
    from wsiseg.slide import openslide_pixels

    if pillow:
        monkeypatch.setattr(openslide_pixels, "READ_INTO", None)
    backend = OpenSlideBackend(samples["cmu_svs"])
    with openslide.OpenSlide(str(samples["cmu_svs"])) as raw:
        for x, y, w, h in [(700, 900, 512, 512), (0, 0, 37, 512), (2000, 2800, 220, 167), (1234, 17, 1, 1)]:
            plain = np.asarray(raw.read_region((x, y), 0, (w, h)))
            assert (plain[..., 3] == 255).all()
            rgb = backend.read(0, x, y, w, h)
            assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8 and rgb.flags.writeable
            assert np.array_equal(rgb, plain[..., :3])
    backend.close()


def test_translucent_openslide_pixels_are_composited_on_white_as_before(samples, tmp_path):
    """Where OpenSlide returns translucent pixels (a tiled RGBA TIFF made from the CMU sample's pixels),
    the numpy path gives read_region's straight RGBA composited on white, exactly as the Pillow path."""
    from wsiseg.slide.rgb import pillow_on_white

    with openslide.OpenSlide(str(samples["cmu_svs"])) as raw:
        rgba = np.array(raw.read_region((600, 800), 0, (400, 300)))
    rgba[100:, :, 3] = np.arange(400) % 256  # opaque on top, every alpha below
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, tile=(256, 256), photometric="rgb", extrasamples=["unassalpha"], compression="zlib")
    backend = OpenSlideBackend(path)
    with openslide.OpenSlide(str(path)) as raw:
        for x, y, w, h in [(0, 0, 400, 300), (10, 90, 300, 50), (0, 0, 400, 100)]:
            region = raw.read_region((x, y), 0, (w, h))
            assert np.array_equal(backend.read(0, x, y, w, h), pillow_on_white(region))
        translucent = backend.read(0, 0, 0, 400, 300)
    assert (translucent[100:, 0] == 255).all()  # alpha 0: white
    assert np.array_equal(translucent[:100], rgba[:100, :, :3])
    backend.close()


def test_take_rows_columns_equals_take():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    maps = (np.arange(3, 40), np.r_[0:10, 9:20, 22:49], rng.integers(0, 50, 30), np.array([7]), np.arange(0, 50, 2))
    for rows in maps:
        for columns in maps:
            rows_in, columns_in = np.clip(rows, 0, 39), np.clip(columns, 0, 49)
            taken = take_rows_columns(array, rows_in, columns_in)
            assert np.array_equal(taken, array.take(rows_in, 0).take(columns_in, 1))


def test_derived_pyramid_opens_with_all_levels_and_mpp(samples):
    with open_slide(samples["cmu_pyramid_tiff"]) as slide:
        assert slide.format == "openslide:generic-tiff"
        assert slide.mpp == pytest.approx(0.499, abs=1e-4)
        assert slide.level_dimensions[0] == (2220, 2967)
        assert len(slide.level_dimensions) >= 4
        assert slide.level_downsamples[-1] >= 8


def test_other_openslide_formats(samples):
    with open_slide(samples["boxes_tiff"]) as boxes:
        assert boxes.level_dimensions == [(300, 250), (150, 125), (75, 62), (37, 31)]
    with open_slide(samples["boxes_dcm"]) as dicom:  # a DICOM WSI folder
        assert dicom.format == "openslide:dicom" and dicom.mpp == pytest.approx(0.499)
        assert dicom.read(0, 0, 16, 16, 0.499).shape == (16, 16, 3)
    with open_slide(samples["small_svs"]) as small:
        assert small.level_dimensions == [(16, 16)]


def test_ome_tiff_through_tifffile(samples, tmp_path):
    with open_slide(samples["cmu_svs"]) as svs:
        image = svs.read(0, 0, 600, 500, 0.499)
    path = tmp_path / "region.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=1, tile=(128, 128), compression="zlib",
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.499, "PhysicalSizeY": 0.499})
        tif.write(image[::2, ::2], subfiletype=1, tile=(128, 128), compression="zlib")
    with open_slide(path) as slide:
        assert slide.format == "tifffile:ome-tiff"
        assert slide.level_dimensions == [(600, 500), (300, 250)]
        assert slide.mpp == pytest.approx(0.499)
        assert np.array_equal(slide.read(10, 20, 300, 200, 0.499), image[20:220, 10:310])
        assert slide.read(0, 0, 300, 250, 0.998).shape == (250, 300, 3)


def test_striped_tiff_openslide_rejects(tmp_path, samples):
    with open_slide(samples["hgsc_image"], slide_mpp=0.5) as jpg:
        image = jpg.read(0, 0, 300, 200, 0.5)
    path = tmp_path / "striped.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    assert openslide.OpenSlide.detect_format(str(path)) is None
    with open_slide(path) as slide:
        assert slide.format == "tifffile:tiff"
        assert slide.mpp == pytest.approx(0.25)
        assert np.array_equal(slide.read(0, 0, 300, 200, 0.25), image)


def test_plain_image_needs_mpp_and_composites_alpha(tmp_path, samples):
    with open_slide(samples["hgsc_image"]) as jpg:
        assert jpg.level_dimensions == [(1500, 1500)]
        with pytest.raises(WsisegError, match="--slide-mpp"):
            jpg.size_at(0.5)
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:20, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    with open_slide(tmp_path / "alpha.png", slide_mpp=0.5) as png:
        pixels = png.read(0, 0, 50, 40, 0.5)
    assert (pixels[:20] == (200, 0, 0)).all() and (pixels[20:] == 255).all()


def test_bounds_offset_is_the_origin(samples):
    """Coordinates start at the bounds origin and the size is the bounds size (MRXS-style slides)."""

    class OffsetImage(ImageBackend):
        bounds = Bounds(100, 50, 1200, 1000)

    with open_slide(samples["hgsc_image"], slide_mpp=0.5) as plain:
        expected = plain.read(100, 50, 64, 64, 0.5)
        slide = open_slide(samples["hgsc_image"], slide_mpp=0.5)
        slide._backend = OffsetImage(samples["hgsc_image"])
        assert slide.size_at(1.0) == (600, 500)
        assert np.array_equal(slide.read(0, 0, 64, 64, 0.5), expected)


def test_upsampling_and_its_limit(samples):
    with open_slide(samples["cmu_svs"]) as slide:
        up = slide.read(1000, 1000, 64, 64, 0.25).astype(int)
        base = slide.read(500, 500, 32, 32, 0.499).astype(int)
        assert np.abs(up[::2, ::2] - base).mean() < 20
        with pytest.raises(WsisegError, match="finer"):
            slide.size_at(0.1)


@pytest.mark.parametrize("key", ["cmu_svs", "cmu_pyramid_tiff", "hgsc_image"])
def test_planar_reads_match_reads(samples, key):
    with open_slide(samples[key], slide_mpp=0.499 if key == "hgsc_image" else None) as slide:
        for x, y, w, h, mpp in [(300, 500, 96, 64, 0.499), (2150, 2900, 100, 100, 0.499), (-20, 10, 50, 40, 0.499),
                                (200, 300, 64, 64, 1.0)]:
            planar = slide.read_planar(x, y, w, h, mpp)
            assert planar.shape == (3, h, w) and planar.flags.c_contiguous
            assert np.array_equal(planar, slide.read(x, y, w, h, mpp).transpose(2, 0, 1))


def test_slide_pickles_by_path_and_reopens(samples):
    slide = open_slide(samples["cmu_svs"])
    before = slide.read(500, 500, 32, 32, 1.0)
    clone = pickle.loads(pickle.dumps(slide))
    assert clone._backend is None
    assert np.array_equal(clone.read(500, 500, 32, 32, 1.0), before)
    slide.close()


def test_thumbnail_keeps_aspect(samples):
    with open_slide(samples["cmu_svs"]) as slide:
        thumbnail = slide.thumbnail(300)
    assert thumbnail.shape == (300, 224, 3)


@pytest.mark.parametrize(
    ("key", "words"),
    [
        (None, ("no such",)),
        ("boxes_dcm_parent", ("folder",)),
        ("efficientnet_lite0_pth", ("not a slide",)),
        ("unreadable_svs", ("corrupt",)),
        ("unopenable_tiff", ("corrupt",)),
    ],
)
def test_bad_slides_raise_user_errors(samples, tmp_path, key, words):
    path = {None: tmp_path / "missing.svs", "boxes_dcm_parent": tmp_path}.get(key) or samples[key]
    with pytest.raises(WsisegError) as error:
        open_slide(path)
    for word in words:
        assert word in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_info_command_bad_input_is_one_line(samples, tmp_path):
    assert_user_error(run_cli("info", samples["unreadable_svs"]), "corrupt")
    assert_user_error(run_cli("info", tmp_path), "folder")
