"""One slide abstraction over OpenSlide, tifffile and plain images, read at any MPP on an integer grid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsiseg.errors import WsisegError
from wsiseg.slide.backends import Backend, Bounds, open_backend
from wsiseg.slide.grid import Frame, snap

# Reading finer than the slide's own resolution upsamples; beyond this factor we refuse (likely a wrong MPP).
MAX_UPSAMPLE = 4.0
# A level counts as fine enough when its downsample exceeds the wanted one by less than this (pyramid
# levels of odd-sized images have downsamples like 2.0003 for a nominal 2).
LEVEL_TOLERANCE = 0.01
# Within this relative difference of the chosen level's own resolution (0.499 vs 0.5 MPP is 0.2%), a read
# takes that level's nearest pixels instead of resampling: at most one row or column in 50 is repeated or
# dropped and every other pixel is the scanner's own, where a filter would blur them all by a fraction of
# a pixel, and it costs a copy instead of a filter pass.
NEAREST_TOLERANCE = 0.02
# Largest source region (in level pixels, per side) read at once when building a thumbnail.
THUMBNAIL_BLOCK = 4096


def take_runs(array: np.ndarray, indices: np.ndarray, axis: int) -> np.ndarray:
    """`array.take(indices, axis)`, by slices when the indices form few consecutive runs (near-identity maps)."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    if len(breaks) > 16:
        return array.take(indices, axis)
    edges = [0, *breaks.tolist(), len(indices)]
    index: list[slice] = [slice(None)] * array.ndim
    pieces = []
    for start, stop in zip(edges[:-1], edges[1:]):
        index[axis] = slice(int(indices[start]), int(indices[stop - 1]) + 1)
        pieces.append(array[tuple(index)])
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis)


class Slide:
    """A whole-slide image read at any MPP.

    Coordinates passed to `read` are pixels of the image at the requested MPP, whose origin is
    the slide's bounds origin and whose size is `size_at(mpp)`. Pixels outside the slide are
    white. The object pickles as (path, MPP override) and reopens its file lazily.
    """

    def __init__(self, path: str | Path, slide_mpp: float | None = None) -> None:
        self.path = Path(path)
        self.slide_mpp = slide_mpp
        if slide_mpp is not None and not (math.isfinite(slide_mpp) and slide_mpp > 0):
            raise WsisegError(f"--slide-mpp must be a positive number of micrometres per pixel, got {slide_mpp}")
        self._backend: Backend | None = None
        self._open()

    # --- lifecycle -------------------------------------------------------------------------
    def _open(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend(self.path)
        return self._backend

    @property
    def backend(self) -> Backend:
        return self._open()

    def close(self) -> None:
        """Release the file handle (the slide reopens on the next read)."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "slide_mpp": self.slide_mpp}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.slide_mpp = state["slide_mpp"]
        self._backend = None

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, format={self.format!r})"

    # --- properties ------------------------------------------------------------------------
    @property
    def format(self) -> str:
        return self.backend.format

    @property
    def vendor(self) -> str | None:
        return self.backend.vendor

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return list(self.backend.level_dimensions)

    @property
    def level_downsamples(self) -> list[float]:
        return list(self.backend.level_downsamples)

    @property
    def metadata_mpp(self) -> float | None:
        """The base MPP written in the file, if any."""
        return self.backend.mpp

    @property
    def mpp(self) -> float:
        """Base resolution in micrometres per pixel (the override wins over the metadata)."""
        if self.slide_mpp is not None:
            return float(self.slide_mpp)
        if self.backend.mpp is None:
            raise WsisegError(
                f"{self.path.name} has no resolution (MPP) in its metadata: pass --slide-mpp "
                "(micrometres per pixel of the full-resolution image, e.g. 0.25 at 40x, 0.5 at 20x)"
            )
        return float(self.backend.mpp)

    @property
    def objective_power(self) -> float | None:
        return self.backend.objective_power

    @property
    def bounds(self) -> Bounds:
        return self.backend.bounds

    @property
    def associated_images(self) -> list[str]:
        return list(self.backend.associated_images)

    @property
    def properties(self) -> dict[str, str]:
        return dict(self.backend.properties)

    # --- geometry --------------------------------------------------------------------------
    def scale_for(self, mpp: float) -> float:
        """Level-0 pixels per pixel of the image at `mpp`, checking that `mpp` is usable."""
        if not (math.isfinite(mpp) and mpp > 0):
            raise WsisegError(f"target MPP must be a positive number, got {mpp}")
        scale = mpp / self.mpp
        if scale < 1 / MAX_UPSAMPLE - 1e-9:
            raise WsisegError(
                f"target MPP {mpp:g} is more than {MAX_UPSAMPLE:g}x finer than the slide's {self.mpp:g}: "
                "choose a coarser --mpp, or pass --slide-mpp if the slide's MPP metadata is wrong"
            )
        return scale

    def frame(self, mpp: float | None = None) -> Frame:
        """The image of the slide's bounds at `mpp` (default: level 0), checking that `mpp` is usable."""
        if mpp is not None:
            self.scale_for(mpp)
        return Frame.over(self.bounds, self.mpp, mpp)

    def size_at(self, mpp: float) -> tuple[int, int]:
        """(width, height) of the whole slide (its bounds) at `mpp`: round(size * mpp0 / mpp)."""
        return self.frame(mpp).size

    def best_level(self, scale: float) -> int:
        """The coarsest level that is (within LEVEL_TOLERANCE) at least as fine as `scale` level-0 px per pixel."""
        downsamples = self.backend.level_downsamples
        usable = [level for level, d in enumerate(downsamples) if d <= scale * (1 + LEVEL_TOLERANCE)]
        return max(usable, key=lambda level: downsamples[level], default=0)

    # --- reading ---------------------------------------------------------------------------
    def read(self, x: int, y: int, width: int, height: int, mpp: float) -> np.ndarray:
        """RGB uint8 (height, width, 3) of the box at (x, y) in the image at `mpp`, composited on white.

        The array may be a non-contiguous view (np.ascontiguousarray it where that matters).
        """
        return self.read_scaled(x, y, width, height, self.scale_for(mpp))

    def read_planar(self, x: int, y: int, width: int, height: int, mpp: float) -> np.ndarray:
        """Like `read`, as a contiguous (3, height, width) array (the layout of tile stores)."""
        scale = self.scale_for(mpp)
        if abs(scale - 1.0) < 1e-9:
            bounds = self.backend.bounds
            return self.backend.read_planar(0, bounds.x + x, bounds.y + y, width, height)
        return np.ascontiguousarray(self.read_scaled(x, y, width, height, scale).transpose(2, 0, 1))

    def read_scaled(self, x: int, y: int, width: int, height: int, scale: float) -> np.ndarray:
        """Like `read`, with the resolution given as level-0 pixels per output pixel."""
        if width <= 0 or height <= 0:
            raise ValueError(f"read size must be positive, got {width}x{height}")
        backend = self.backend
        bx, by = backend.bounds.x, backend.bounds.y
        if abs(scale - 1.0) < 1e-9:
            return backend.read(0, bx + x, by + y, width, height)
        level = self.best_level(scale)
        downsample = backend.level_downsamples[level]
        if abs(scale / downsample - 1.0) <= NEAREST_TOLERANCE:
            return self._read_nearest(level, x, y, width, height, scale)
        # The box in (float) level pixels, then the integer superset read from the level.
        fx0, fy0 = (bx + x * scale) / downsample, (by + y * scale) / downsample
        fx1, fy1 = (bx + (x + width) * scale) / downsample, (by + (y + height) * scale) / downsample
        margin = 2 + int(math.ceil(scale / downsample))  # room for the resampling filter's support
        lx0, ly0 = int(math.floor(fx0)) - margin, int(math.floor(fy0)) - margin
        lx1, ly1 = int(math.ceil(fx1)) + margin, int(math.ceil(fy1)) + margin
        patch = backend.read(level, lx0, ly0, lx1 - lx0, ly1 - ly0)
        dx, dy = backend.offset(level, lx0, ly0)
        box = (fx0 - lx0 - dx, fy0 - ly0 - dy, fx1 - lx0 - dx, fy1 - ly0 - dy)
        # Area averaging when shrinking, bicubic when enlarging.
        resample = Image.Resampling.BOX if scale >= downsample else Image.Resampling.BICUBIC
        image = Image.fromarray(patch).resize((width, height), resample=resample, box=box)
        return np.asarray(image)

    def _read_nearest(self, level: int, x: int, y: int, width: int, height: int, scale: float) -> np.ndarray:
        """The pixels of `level` nearest to the centres of the output pixels of the box (x, y, width, height).

        Centres are computed from absolute output coordinates, so a pixel is the same in every box
        that holds it (tiles agree with a whole read).
        """
        backend = self.backend
        downsample = backend.level_downsamples[level]
        centres_x = (backend.bounds.x + (x + np.arange(width) + 0.5) * scale) / downsample
        centres_y = (backend.bounds.y + (y + np.arange(height) + 0.5) * scale) / downsample
        # one pixel of margin each side for the backend's sub-pixel offset
        lx0, ly0 = int(math.floor(centres_x[0])) - 1, int(math.floor(centres_y[0])) - 1
        lw, lh = int(math.floor(centres_x[-1])) + 2 - lx0, int(math.floor(centres_y[-1])) + 2 - ly0
        dx, dy = backend.offset(level, lx0, ly0)
        patch = backend.read(level, lx0, ly0, lw, lh)
        columns = np.clip(np.floor(centres_x - dx).astype(np.int64) - lx0, 0, lw - 1)
        rows = np.clip(np.floor(centres_y - dy).astype(np.int64) - ly0, 0, lh - 1)
        return take_runs(take_runs(patch, rows, 0), columns, 1)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole slide (its bounds) as RGB with its longer side `max_side`, read in bounded blocks."""
        bounds = self.backend.bounds
        scale = max(bounds.width, bounds.height) / max_side
        return self.read_whole(scale)

    def read_whole(self, scale: float) -> np.ndarray:
        """The whole slide at `scale` level-0 pixels per pixel, assembled from blocks of bounded size."""
        bounds = self.backend.bounds
        width, height = max(1, snap(bounds.width / scale)), max(1, snap(bounds.height / scale))
        downsample = self.backend.level_downsamples[self.best_level(scale)]
        block = max(64, int(THUMBNAIL_BLOCK * downsample / scale))
        out = np.empty((height, width, 3), np.uint8)
        for y in range(0, height, block):
            for x in range(0, width, block):
                w, h = min(block, width - x), min(block, height - y)
                out[y : y + h, x : x + w] = self.read_scaled(x, y, w, h, scale)
        return out

    def info(self) -> dict[str, Any]:
        """A JSON-friendly description: format, levels, MPP, objective power, bounds, associated images."""
        backend = self.backend
        return {
            "path": str(self.path),
            "format": backend.format,
            "vendor": backend.vendor,
            "levels": [
                {"level": i, "width": w, "height": h, "downsample": round(d, 4)}
                for i, ((w, h), d) in enumerate(zip(backend.level_dimensions, backend.level_downsamples))
            ],
            "mpp": self.slide_mpp if self.slide_mpp is not None else backend.mpp,
            "mpp_source": "override" if self.slide_mpp is not None else ("metadata" if backend.mpp else None),
            "objective_power": backend.objective_power,
            "bounds": dict(zip(("x", "y", "width", "height"), backend.bounds)),
            "associated_images": list(backend.associated_images),
        }


def open_slide(path: str | Path, slide_mpp: float | None = None) -> Slide:
    """Open a slide (OpenSlide formats, OME/other TIFF, PNG/JPEG) or raise a WsisegError saying why not."""
    return Slide(path, slide_mpp)
