"""Tiled pyramidal TIFF writing in the two flavours viewers want.

- "openslide": BigTIFF, every level a top-level tiled page, reduced levels flagged as
  reduced-resolution (OpenSlide and ASAP show all levels and read the MPP).
- "ome": OME-TIFF with the reduced levels as SubIFDs (QuPath / Bio-Formats).

Label pyramids (`pad_value` given) are padded at the right and bottom so that every level is
exactly half the previous one: OpenSlide derives each level's downsample from the level sizes,
and a rounded size (1484 of 2967) makes it interpolate between labels. They also stop before a
level would be narrower than one tile, which OpenSlide 3.4 shows blank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.errors import WsisegError

FLAVOURS = ("openslide", "ome")
REDUCED_RESOLUTION = 1  # TIFF NewSubfileType bit for a reduced-resolution page


def downsample_by_two(image: np.ndarray, method: str = "nearest") -> np.ndarray:
    """Halve an (H, W) or (H, W, C) image: `nearest` for labels, `mean` for RGB."""
    if method == "nearest":
        return image[::2, ::2]
    if method == "mean":
        height, width = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
        if height == 0 or width == 0:
            return image[::2, ::2]
        blocks = image[:height, :width].astype(np.float32)
        blocks = blocks.reshape(height // 2, 2, width // 2, 2, *image.shape[2:]).mean(axis=(1, 3))
        return np.round(blocks).astype(image.dtype)
    raise ValueError(f"unknown downsampling method {method!r}: use 'nearest' or 'mean'")


def build_pyramid(image: np.ndarray, min_size: int = 512, method: str = "nearest") -> list[np.ndarray]:
    """Levels of an in-memory image, each half the previous, until both sides fit `min_size`."""
    levels = [image]
    while max(levels[-1].shape[:2]) > min_size:
        levels.append(downsample_by_two(levels[-1], method))
    return levels


def exact_level_shapes(height: int, width: int, tile: int, max_levels: int | None = None) -> list[tuple[int, int]]:
    """Level shapes of a padded pyramid: each exactly half the previous, none narrower than `tile`.

    Level 0 is (height, width) rounded up to a multiple of 2^(levels-1) (and to at least one
    tile); the level count is the largest (at most `max_levels`) whose last level is still
    `tile` or more on both sides.
    """
    levels = 1
    while (max_levels is None or levels < max_levels) and -(-min(height, width) // 2**levels) >= tile:
        levels += 1
    factor = 2 ** (levels - 1)
    top = (max(tile, -(-height // factor)), max(tile, -(-width // factor)))
    return [(top[0] * 2 ** (levels - 1 - index), top[1] * 2 ** (levels - 1 - index)) for index in range(levels)]


def _tiles(level: Any, tile: int, shape: tuple[int, int], fill: int = 0) -> Iterator[np.ndarray]:
    """Row-major tiles over `shape` of an array-like (numpy or zarr), `fill` beyond its own extent."""
    height, width = shape
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            block = np.asarray(level[y : y + tile, x : x + tile])
            if block.shape[:2] != (tile, tile):
                padded = np.full((tile, tile, *block.shape[2:]), fill, dtype=block.dtype)
                padded[: block.shape[0], : block.shape[1]] = block
                block = padded
            yield block


def _colormap_array(colormap: Sequence[Sequence[int]]) -> np.ndarray:
    """A TIFF palette (3, 256) uint16 from a list of RGB triplets (0..255) indexed by label."""
    palette = np.zeros((3, 256), dtype=np.uint16)
    for label, rgb in enumerate(list(colormap)[:256]):
        palette[:, label] = np.asarray(rgb[:3], dtype=np.uint16) * 257
    return palette


def write_pyramidal_tiff(
    path: Path,
    levels: Sequence[Any] | np.ndarray,
    mpp: float,
    flavour: str = "openslide",
    tile: int = 512,
    compression: str = "zstd",
    colormap: Sequence[Sequence[int]] | None = None,
    downsample: str = "nearest",
    pad_value: int | None = None,
) -> Path:
    """Write a tiled pyramidal TIFF of an image or label mask.

    `levels` is either one in-memory array (its pyramid is built by halving with
    `downsample`) or a list of array-likes (numpy or zarr), full resolution first, each the
    previous halved (rounding up). `mpp` is the full-resolution micrometres per pixel, stored
    as centimetre resolution so OpenSlide 4 reports it. `colormap` (RGB per label) makes a
    palette image, so labels show in colour. With `pad_value`, the levels are padded with it to
    exact halves and cut to those at least one tile wide (see the module doc).
    """
    import tifffile

    if flavour not in FLAVOURS:
        raise WsisegError(f"unknown TIFF flavour {flavour!r}: use one of {', '.join(FLAVOURS)}")
    if tile % 16:
        raise WsisegError(f"TIFF tile size {tile} must be a multiple of 16")
    if isinstance(levels, np.ndarray):
        levels = build_pyramid(levels, min_size=tile, method=downsample)
    shapes = [tuple(level.shape[:2]) for level in levels]
    if pad_value is not None:
        shapes = exact_level_shapes(*shapes[0], tile, max_levels=len(levels))
        levels = levels[: len(shapes)]
    base_width = shapes[0][1]
    first = np.asarray(levels[0][:1, :1])
    rgb = first.ndim == 3 and first.shape[2] == 3
    if colormap is not None and (rgb or first.dtype != np.uint8):
        raise WsisegError("a colour table needs a single-channel uint8 label image")
    photometric = "rgb" if rgb else ("palette" if colormap is not None else "minisblack")
    options: dict[str, Any] = {
        "photometric": photometric,
        "compression": compression,
        "tile": (tile, tile),
        "resolutionunit": "CENTIMETER",
        "metadata": None,
    }
    if compression == "jpeg":
        options["compressionargs"] = {"level": 90}
    if colormap is not None:
        options["colormap"] = _colormap_array(colormap)

    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=True, ome=flavour == "ome") as writer:
        for index, (level, (height, width)) in enumerate(zip(levels, shapes)):
            scale = base_width / width
            per_cm = 1e4 / (mpp * scale)
            page = dict(options, resolution=(per_cm, per_cm))
            if flavour == "ome" and index == 0:
                page["metadata"] = _ome_metadata(rgb, mpp)
                page["subifds"] = len(levels) - 1
            if index > 0:
                page["subfiletype"] = REDUCED_RESOLUTION
            writer.write(
                _tiles(level, tile, (height, width), pad_value or 0),
                shape=(height, width, 3) if rgb else (height, width),
                dtype=first.dtype,
                **page,
            )
    return path


def _ome_metadata(rgb: bool, mpp: float) -> dict[str, Any]:
    """OME metadata with the physical pixel size in micrometres."""
    return {
        "axes": "YXS" if rgb else "YX",
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": "µm",
    }
