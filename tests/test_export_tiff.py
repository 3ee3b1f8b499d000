"""Pyramidal TIFF in both flavours, read back by OpenSlide and tifffile."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile

from wsiseg.errors import WsisegError
from wsiseg.export.tiff import build_pyramid, downsample_by_two, write_pyramidal_tiff


def label_image() -> np.ndarray:
    labels = np.zeros((1300, 900), dtype=np.uint8)
    labels[100:700, 50:600] = 1
    labels[800:1250, 300:880] = 2
    return labels


def test_openslide_flavour_has_every_level_mpp_and_colours(tmp_path):
    labels = label_image()
    path = write_pyramidal_tiff(tmp_path / "mask.tif", labels, mpp=0.5, tile=256, colormap=[(0, 0, 0), (255, 0, 0), (0, 0, 255)])
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == len(build_pyramid(labels, min_size=256)) == 4
        assert slide.dimensions == (900, 1300)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert tuple(np.asarray(slide.read_region((100, 200), 0, (1, 1)))[0, 0, :3]) == (255, 0, 0)
        assert tuple(np.asarray(slide.read_region((400, 900), 0, (1, 1)))[0, 0, :3]) == (0, 0, 255)
    with tifffile.TiffFile(path) as tiff:
        assert np.array_equal(tiff.pages[0].asarray(), labels)
        assert np.array_equal(tiff.pages[1].asarray(), labels[::2, ::2])


def test_ome_flavour_keeps_levels_as_subifds(tmp_path):
    labels = label_image()
    path = write_pyramidal_tiff(tmp_path / "mask.ome.tif", labels, mpp=1.0, flavour="ome", tile=256)
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_ome
        assert len(tiff.pages) == 1
        levels = tiff.series[0].levels
        assert [level.shape for level in levels] == [(1300, 900), (650, 450), (325, 225), (163, 113)]
        assert np.array_equal(levels[2].asarray(), labels[::4, ::4])
        assert 'PhysicalSizeX="1.0"' in tiff.ome_metadata


def test_levels_can_come_from_array_likes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (600, 500, 3), dtype=np.uint8)
    levels = [rgb, downsample_by_two(rgb, "mean")]
    path = write_pyramidal_tiff(tmp_path / "rgb.tif", levels, mpp=0.25, tile=256, compression="zstd")
    with openslide.OpenSlide(path) as slide:
        assert slide.level_dimensions == ((500, 600), (250, 300))
        assert np.array_equal(np.asarray(slide.read_region((0, 0), 1, (250, 300)))[..., :3], levels[1])


def test_mean_downsampling_averages_blocks():
    image = np.array([[0, 2], [4, 6]], dtype=np.uint8)[..., None]
    assert downsample_by_two(image, "mean")[0, 0, 0] == 3


def test_colour_table_needs_labels(tmp_path):
    with pytest.raises(WsisegError, match="colour table"):
        write_pyramidal_tiff(tmp_path / "x.tif", np.zeros((64, 64, 3), np.uint8), 0.5, colormap=[(0, 0, 0)])


# --- label masks as OpenSlide and ASAP read them ---------------------------------------------------


def _blobs(height: int, width: int, classes: int, seed: int) -> np.ndarray:
    """Labels in blocks of a few pixels plus single-pixel specks, so any interpolation shows."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, classes, (height // 7 + 1, width // 7 + 1))
    labels = np.kron(coarse, np.ones((7, 7), np.int64))[:height, :width]
    specks = rng.random((height, width)) < 0.02
    labels[specks] = rng.integers(0, classes, int(specks.sum()))
    return labels.astype(np.uint8)


def _mask_store(path, labels: np.ndarray, background: int = 0):
    from wsiseg.slide.grid import Frame
    from wsiseg.store.masks import MaskStore

    names = [f"class{i}" for i in range(int(labels.max()) + 1)]
    store = MaskStore.create(path, Frame(labels.shape[1], labels.shape[0], 0.5, 0.5), class_names=names, chunk=128,
                             background=background)
    store.write_rows(0, labels)
    store.finish()
    return store


def _openslide_labels(region) -> tuple[np.ndarray, np.ndarray]:
    """(labels, opaque) of a read_region result of a min-is-black label TIFF (grey value = label)."""
    rgba = np.asarray(region)
    assert np.array_equal(rgba[..., 0], rgba[..., 1]) and np.array_equal(rgba[..., 0], rgba[..., 2])
    return rgba[..., 0], rgba[..., 3] == 255


@pytest.mark.parametrize(("height", "width", "background"), [(1111, 777, 0), (700, 1030, 2)])
def test_openslide_reads_every_level_exactly_at_any_offset(tmp_path, height, width, background):
    from wsiseg.export.mask import write_mask_tiff
    from wsiseg.export.tiff import exact_level_shapes

    store = _mask_store(tmp_path / "mask.zarr", _blobs(height, width, 5, seed=height), background)
    path = write_mask_tiff(store, tmp_path / "mask.tif", tile=64)
    shapes = exact_level_shapes(height, width, 64, max_levels=store.num_levels)
    assert len(shapes) >= 4
    rng = np.random.default_rng(0)
    with openslide.OpenSlide(path) as slide:
        assert slide.level_dimensions == tuple((w, h) for h, w in shapes)
        assert slide.level_downsamples == tuple(float(2**level) for level in range(len(shapes)))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        for level, (level_height, level_width) in enumerate(shapes):
            for _ in range(200):
                x, y = int(rng.integers(0, level_width - 20)), int(rng.integers(0, level_height - 20))
                size = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
                labels, opaque = _openslide_labels(slide.read_region((x * 2**level, y * 2**level), level, size))
                expected = store.read(x, y, *size, level=level)
                inside = np.zeros(size[::-1], bool)
                inside[: max(0, level_height - y), : max(0, level_width - x)] = True
                assert opaque[inside].all()
                # the padding beyond the mask is background
                mask_height, mask_width = store.level(level).shape
                expected[max(0, mask_height - y) :, :] = background
                expected[:, max(0, mask_width - x) :] = background
                assert np.array_equal(labels[inside], expected[inside]), (level, x, y, size)


def test_label_tiff_is_what_asap_reads(tmp_path):
    from wsiseg.export.mask import write_mask_tiff

    store = _mask_store(tmp_path / "mask.zarr", _blobs(1001, 1301, 4, seed=1))
    path = write_mask_tiff(store, tmp_path / "mask.tif")
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_bigtiff and len(tiff.pages) == 2  # a 3rd level (251 px) would be narrower than a tile
        for index, page in enumerate(tiff.pages):
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert page.photometric == tifffile.PHOTOMETRIC.MINISBLACK
            assert page.samplesperpixel == 1 and page.dtype == np.uint8
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
            assert page.imagewidth >= 256 and page.imagelength >= 256
            assert page.subfiletype == (1 if index else 0)
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert tiff.pages[0].shape == (1002, 1302) and tiff.pages[1].shape == (501, 651)
        level0 = tiff.pages[0].asarray()
        assert np.array_equal(level0[:1001, :1301], store.level(0)[:])
        assert not level0[1001:].any() and not level0[:, 1301:].any()


def test_palette_flavour_shows_class_colours_in_openslide(tmp_path):
    from wsiseg.export.mask import export_mask

    labels = _blobs(600, 520, 3, seed=3)
    store = _mask_store(tmp_path / "mask.zarr", labels)
    path = export_mask(tmp_path / "mask.zarr", "palette-tiff")
    assert path.name == "mask.palette.tif"
    with tifffile.TiffFile(path) as tiff:
        assert tiff.pages[0].photometric == tifffile.PHOTOMETRIC.PALETTE
    with openslide.OpenSlide(path) as slide:
        for level in range(slide.level_count):
            height, width = store.level(level).shape
            rgb = np.asarray(slide.read_region((0, 0), level, (width, height)))[..., :3]
            assert np.array_equal(rgb, np.asarray(store.colors, np.uint8)[store.level(level)[:]])
