"""Synthetic pyramidal slides for benchmarks: tiled zstd BigTIFF that OpenSlide opens, mostly tissue.

Tiles come from a small bank of smooth H&E-coloured textures, compressed once and repeated,
so a 60,000 x 60,000 slide is written in about a minute. A white margin around the tissue
gives the tissue detector a background to separate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

TILE = 512
BANK = 12


def _texture_bank(seed: int = 0) -> list[np.ndarray]:
    """Smooth pink/purple textures (H&E-like saturation) of TILE x TILE."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:TILE, 0:TILE].astype(np.float32) / TILE
    bank = []
    for _ in range(BANK):
        field = np.zeros((TILE, TILE), np.float32)
        for _ in range(6):
            fx, fy, phase = rng.uniform(1, 9), rng.uniform(1, 9), rng.uniform(0, 2 * math.pi)
            field += np.sin(2 * math.pi * (fx * xx + fy * yy) + phase)
        field = (field - field.min()) / (np.ptp(field) + 1e-6)
        pink, purple = np.array([235, 150, 190], np.float32), np.array([120, 60, 150], np.float32)
        bank.append((pink * (1 - field[..., None]) + purple * field[..., None]).astype(np.uint8))
    return bank


def _level_tiles(width: int, height: int, margin: float, textures: list[np.ndarray], encoded: list[bytes],
                 white: bytes) -> Iterator[bytes]:
    """Compressed tiles of one level, row by row: tissue inside a margin of the level's size, white outside."""
    import imagecodecs

    x0, x1 = round(margin * width), round((1 - margin) * width)
    y0, y1 = round(margin * height), round((1 - margin) * height)
    index = itertools.count()
    for top in range(0, height, TILE):
        for left in range(0, width, TILE):
            k = next(index) % len(textures)
            if left >= x0 and left + TILE <= x1 and top >= y0 and top + TILE <= y1:
                yield encoded[k]
            elif left >= x1 or left + TILE <= x0 or top >= y1 or top + TILE <= y0:
                yield white
            else:  # a tile on the edge of the tissue: texture inside, white outside
                tile = np.full((TILE, TILE, 3), 255, np.uint8)
                sx, ex = max(x0 - left, 0), min(x1 - left, TILE)
                sy, ey = max(y0 - top, 0), min(y1 - top, TILE)
                tile[sy:ey, sx:ex] = textures[k][sy:ey, sx:ex]
                yield imagecodecs.zstd_encode(tile.tobytes())


def write_synthetic_slide(path: Path, width: int, height: int, mpp: float = 0.25, margin: float = 0.05,
                          seed: int = 0) -> Path:
    """Write a tiled pyramidal BigTIFF (levels downsampled by 4) of `width` x `height` at `mpp`."""
    import imagecodecs
    import tifffile

    textures = _texture_bank(seed)
    encoded = [imagecodecs.zstd_encode(t.tobytes()) for t in textures]
    white = imagecodecs.zstd_encode(np.full((TILE, TILE, 3), 255, np.uint8).tobytes())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    levels = [(width, height)]
    while max(levels[-1]) > 4 * TILE:
        w, h = levels[-1]
        levels.append((math.ceil(w / 4), math.ceil(h / 4)))
    with tifffile.TiffWriter(partial, bigtiff=True) as writer:
        for index, (w, h) in enumerate(levels):
            per_cm = 1e4 / (mpp * width / w)
            writer.write(
                _level_tiles(w, h, margin, textures, encoded, white), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE),
                photometric="rgb", compression="zstd", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                subfiletype=1 if index else 0, metadata=None,
            )
    partial.rename(path)
    return path
