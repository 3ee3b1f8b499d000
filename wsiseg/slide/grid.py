"""Integer window grids over an image at a target MPP: the one place that computes tile positions."""

from __future__ import annotations

from dataclasses import dataclass

from wsiseg.errors import WsisegError
from wsiseg.slide.mask import TissueMask


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
