"""Geometry: the Frame of an image of a slide (where its pixels lie on the slide) and integer window grids over it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wsiseg.errors import WsisegError
from wsiseg.slide.mask import TissueMask


def snap(value: float) -> int:
    """Round half up (never banker's rounding), so every size on the integer grid is reproducible."""
    return int(math.floor(value + 0.5))


@dataclass(frozen=True)
class Frame:
    """An image of a slide region: `width` x `height` pixels of `mpp` micrometres, on a slide of `slide_mpp`.

    Pixel (x, y) starts at level-0 pixel `origin + (x, y) * scale`, with scale = mpp / slide_mpp
    level-0 pixels per pixel and `origin` the slide's bounds origin (OpenSlide's bounds offset) in
    level-0 pixels. Tile stores, mask stores, tissue masks, annotations and exports map between
    slide coordinates and their pixels with it, and with nothing else.
    """

    width: int
    height: int
    mpp: float
    slide_mpp: float
    origin: tuple[float, float] = (0, 0)

    @classmethod
    def over(cls, bounds: Sequence[float], slide_mpp: float, mpp: float | None = None) -> Frame:
        """The image of `bounds` (x, y, width, height in level-0 pixels) at `mpp` (default: the slide's own):
        sizes are round(size / scale), rounding half up."""
        mpp = slide_mpp if mpp is None else mpp
        x, y, width, height = bounds
        scale = mpp / slide_mpp
        return cls(snap(width / scale), snap(height / scale), mpp, slide_mpp, (x, y))

    @property
    def scale(self) -> float:
        """Level-0 pixels per pixel of this image."""
        return self.mpp / self.slide_mpp

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """The region covered, as (x, y, width, height) in level-0 pixels."""
        scale = self.scale
        return self.origin[0], self.origin[1], self.width * scale, self.height * scale

    @property
    def origin_um(self) -> tuple[float, float]:
        """The origin in micrometres of the slide (OME-Zarr translations)."""
        return self.origin[0] * self.slide_mpp, self.origin[1] * self.slide_mpp

    def at(self, mpp: float) -> Frame:
        """The same region at `mpp` (sizes exact from a level-0 frame, whose extent is whole pixels)."""
        return Frame.over(self.bounds, self.slide_mpp, mpp)

    def level(self, index: int) -> Frame:
        """Pyramid level `index` of this image: pixels 2^index as wide, sides halved rounding up (as stores do)."""
        width, height = self.width, self.height
        for _ in range(index):
            width, height = (width + 1) // 2, (height + 1) // 2
        return Frame(width, height, 2**index * self.mpp, self.slide_mpp, self.origin)

    def to_slide(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Level-0 slide coordinates of positions (numbers or arrays) in this image's pixels."""
        scale = self.scale
        return x * scale + self.origin[0], y * scale + self.origin[1]

    def from_slide(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Positions in this image's pixels of level-0 slide coordinates (numbers or arrays)."""
        scale = self.scale
        return (x - self.origin[0]) / scale, (y - self.origin[1]) / scale


def _starts(size: int, window: int, stride: int, clamp: bool) -> list[int]:
    if size <= window:
        return [0]
    if not clamp:
        return list(range(0, size, stride))
    starts = list(range(0, size - window, stride))
    return starts + [size - window]


@dataclass(frozen=True)
class Grid:
    """Windows of `window` pixels every `stride` pixels over a `width` x `height` image.

    Positions are 0, stride, 2*stride, ...; with `clamp` (the default) the last one is moved to
    `size - window` so every window lies inside the image (an image smaller than the window gets
    a single window at 0, padded white when read). Without `clamp` the positions continue to the
    edge and the last windows are partial (chunk grids of stores).
    """

    width: int
    height: int
    window: int
    stride: int
    clamp: bool = True

    def __post_init__(self) -> None:
        if self.window < 1 or self.stride < 1:
            raise WsisegError(f"window and stride must be at least 1 pixel (got {self.window} and {self.stride})")
        if self.width < 1 or self.height < 1:
            raise WsisegError(f"the image at this MPP is empty ({self.width}x{self.height}); choose a finer --mpp")

    @classmethod
    def from_overlap(cls, width: int, height: int, window: int, overlap_fraction: float) -> Grid:
        """A grid whose neighbouring windows overlap by `overlap_fraction` of the window."""
        if not 0 <= overlap_fraction < 1:
            raise WsisegError(f"overlap must be in [0, 1), got {overlap_fraction}")
        return cls(width, height, window, max(1, window - round(overlap_fraction * window)))

    @property
    def xs(self) -> list[int]:
        return _starts(self.width, self.window, self.stride, self.clamp)

    @property
    def ys(self) -> list[int]:
        return _starts(self.height, self.window, self.stride, self.clamp)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of windows."""
        return len(self.ys), len(self.xs)

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def positions(self) -> list[tuple[int, int]]:
        """Top-left corners (x, y), row by row."""
        xs = self.xs
        return [(x, y) for y in self.ys for x in xs]

    def size(self, x: int, y: int) -> tuple[int, int]:
        """(width, height) of the window at (x, y) clipped to the image."""
        return min(self.window, self.width - x), min(self.window, self.height - y)

    def tissue_positions(self, tissue: TissueMask, mpp: float) -> list[tuple[int, int]]:
        """The positions whose window holds any tissue, for an image at `mpp`."""
        return [(x, y) for x, y in self.positions() if tissue.covers(x, y, self.window, self.window, mpp)]
