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
