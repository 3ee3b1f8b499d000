"""File readers behind Slide: OpenSlide, tifffile and Pillow, each returning RGB composited on white."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import tifffile
import zarr
from PIL import Image, UnidentifiedImageError

from wsiseg.errors import WsisegError
from wsiseg.slide.openslide_pixels import read_rgb
from wsiseg.slide.rgb import on_white

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# micrometres per unit of TIFF ResolutionUnit (2 = inch, 3 = centimetre)
RESOLUTION_UNITS = {2: 25400.0, 3: 10000.0}
OME_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def paste(source_read: Callable[[int, int, int, int], np.ndarray], level_w: int, level_h: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """A (h, w, 3) white canvas with the in-image part of the box filled by `source_read(x0, y0, x1, y1)`."""
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, level_w), min(y + h, level_h)
    if x0 == x and y0 == y and x1 == x + w and y1 == y + h:
        return source_read(x0, y0, x1, y1)
    out = np.full((h, w, 3), 255, np.uint8)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = source_read(x0, y0, x1, y1)
    return out


@dataclass(frozen=True)
class Bounds:
    """The slide's non-empty area in level-0 pixels: origin (x, y) and size (width, height)."""

    x: int
    y: int
    width: int
    height: int

    def __iter__(self) -> Iterator[int]:
        return iter((self.x, self.y, self.width, self.height))


class Backend:
    """What Slide needs from a file reader. `read` takes level pixel coordinates and pads white."""

    format: str = ""
    vendor: str | None = None
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None = None
    objective_power: float | None = None
    associated_images: list[str] = []
    properties: dict[str, str] = {}

    @property
    def bounds(self) -> Bounds:
        w, h = self.level_dimensions[0]
        return Bounds(0, 0, w, h)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def read_planar(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Like `read`, as a contiguous (3, h, w) array."""
        return np.ascontiguousarray(self.read(level, x, y, w, h).transpose(2, 0, 1))

    def offset(self, level: int, x: int, y: int) -> tuple[float, float]:
        """Where, in level pixels relative to (x, y), a read at (x, y) really starts (sub-pixel)."""
        return 0.0, 0.0

    def on_grid(self, level: int) -> bool:
        """Whether every read of `level` starts on its pixel grid (`offset` always zero), so that a pixel
        is the same in every box that holds it."""
        return True

    def close(self) -> None:
        """Release file handles."""


def _positive(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


class OpenSlideBackend(Backend):
    """Formats OpenSlide reads: SVS, NDPI, MRXS, SCN, DICOM WSI, Philips TIFF, generic tiled TIFF."""

    def __init__(self, path: Path) -> None:
        self.handle = openslide.OpenSlide(str(path))
        self.name = path.name
        props = self.handle.properties
        self.properties = dict(props)
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
        self.format = f"openslide:{self.vendor}"
        self.level_dimensions = list(self.handle.level_dimensions)
        self.level_downsamples = list(self.handle.level_downsamples)
        mpp_x = _positive(props.get(openslide.PROPERTY_NAME_MPP_X))
        mpp_y = _positive(props.get(openslide.PROPERTY_NAME_MPP_Y))
        self.mpp = (mpp_x + mpp_y) / 2 if mpp_x and mpp_y else (mpp_x or mpp_y)
        self.objective_power = _positive(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        self.associated_images = sorted(self.handle.associated_images.keys())

    @property
    def bounds(self) -> Bounds:
        props = self.properties
        w, h = self.level_dimensions[0]
        if openslide.PROPERTY_NAME_BOUNDS_WIDTH in props:
            return Bounds(
                int(props.get(openslide.PROPERTY_NAME_BOUNDS_X, 0)),
                int(props.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0)),
                int(props[openslide.PROPERTY_NAME_BOUNDS_WIDTH]),
                int(props[openslide.PROPERTY_NAME_BOUNDS_HEIGHT]),
            )
        return Bounds(0, 0, w, h)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        # Only inside the level: OpenSlide misplaces regions that start at negative level coordinates.
        level_w, level_h = self.level_dimensions[level]
        return paste(lambda x0, y0, x1, y1: self._region(level, x0, y0, x1 - x0, y1 - y0), level_w, level_h, x, y, w, h)

    def offset(self, level: int, x: int, y: int) -> tuple[float, float]:
        # OpenSlide places reads at level-0 integer locations: at a non-integer downsample the level
        # pixels it returns sit a fraction of a pixel away from (x, y), interpolated.
        downsample = self.level_downsamples[level]
        x, y = max(x, 0), max(y, 0)
        return round(x * downsample) / downsample - x, round(y * downsample) / downsample - y

    def on_grid(self, level: int) -> bool:
        return float(self.level_downsamples[level]).is_integer()

    def _region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        downsample = self.level_downsamples[level]
        location = (int(round(x * downsample)), int(round(y * downsample)))
        try:
            return read_rgb(self.handle, location, level, (w, h))
        except openslide.OpenSlideError as error:
            raise WsisegError(
                f"{self.name} is corrupt: reading {w}x{h} at {location} (level {level}) failed ({error}); "
                "check the file or re-export it"
            ) from None

    def close(self) -> None:
        self.handle.close()


def _ome_mpp(tif: tifffile.TiffFile) -> float | None:
    try:
        root = ElementTree.fromstring(tif.ome_metadata or "")
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("}Pixels") or element.tag == "Pixels":
            size = _positive(element.get("PhysicalSizeX"))
            unit = OME_UNITS.get(element.get("PhysicalSizeXUnit", "µm"))
            return size * unit if size and unit else None
    return None


def _tiff_mpp(page: tifffile.TiffPage) -> float | None:
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    unit = RESOLUTION_UNITS.get(int(tags["ResolutionUnit"].value))
    numerator, denominator = tags["XResolution"].value
    per_unit = numerator / denominator if denominator else 0
    return unit / per_unit if unit and per_unit > 0 else None


class TiffBackend(Backend):
    """TIFFs through tifffile: OME-TIFF (SubIFD pyramids) and TIFFs OpenSlide rejects (striped, odd layouts)."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        self.tif = tifffile.TiffFile(str(path))
        try:
            self._describe()
        except BaseException:
            self.tif.close()
            raise

    def _describe(self) -> None:
        """Levels, sizes, dtype and MPP of the open TIFF (a WsisegError for pixels wsiseg cannot read)."""
        series = self.tif.series[0]
        self.format = "tifffile:ome-tiff" if self.tif.is_ome else "tifffile:tiff"
        self.levels = []
        for index, level in enumerate(series.levels):
            array = zarr.open_array(series.aszarr(level=index), mode="r")
            self.levels.append((array, self._indexer(level.axes, level.shape)))
        base = series.levels[0]
        sizes = [self._size(level.axes, level.shape) for level in series.levels]
        self.level_dimensions = sizes
        self.level_downsamples = [(sizes[0][0] / w + sizes[0][1] / h) / 2 for w, h in sizes]
        self.dtype = np.dtype(base.dtype)
        if self.dtype not in (np.uint8, np.uint16):
            raise WsisegError(f"{self.name} has {self.dtype} pixels; wsiseg reads 8- or 16-bit brightfield RGB")
        self.mpp = _ome_mpp(self.tif) if self.tif.is_ome else _tiff_mpp(self.tif.pages.first)
        self.properties = {"tiff.axes": base.axes, "tiff.shape": str(base.shape)}

    @staticmethod
    def _size(axes: str, shape: tuple[int, ...]) -> tuple[int, int]:
        return shape[axes.index("X")], shape[axes.index("Y")]

    def _indexer(self, axes: str, shape: tuple[int, ...]) -> tuple[str, int]:
        """Which axis holds the channels, and how many there are ('' when grayscale)."""
        channel_axes = [a for a, n in zip(axes, shape) if a not in "YX" and n > 1]
        if len(channel_axes) > 1 or (channel_axes and shape[axes.index(channel_axes[0])] not in (3, 4)):
            raise WsisegError(
                f"{self.name} has axes {axes} {shape}; wsiseg reads brightfield RGB images (3 or 4 samples)"
            )
        return (channel_axes[0], shape[axes.index(channel_axes[0])]) if channel_axes else ("", 1)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        array, (channel_axis, channels) = self.levels[level]
        axes = self.tif.series[0].levels[level].axes
        level_w, level_h = self.level_dimensions[level]

        def source(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
            index = tuple(
                slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) if a == channel_axis else 0
                for a in axes
            )
            kept = [a for a in axes if a in ("Y", "X") or a == channel_axis]
            block = np.asarray(array[index])
            order = [kept.index("Y"), kept.index("X")] + ([kept.index(channel_axis)] if channel_axis else [])
            block = block.transpose(order)
            if block.dtype == np.uint16:
                block = (block // 257).astype(np.uint8)
            if not channel_axis:
                return np.repeat(block[..., None], 3, axis=2)
            return on_white(block) if channels == 4 else np.ascontiguousarray(block)

        return paste(source, level_w, level_h, x, y, w, h)

    def close(self) -> None:
        self.tif.close()


class ImageBackend(Backend):
    """Plain PNG/JPEG/... images as single-level slides (MPP only from --slide-mpp)."""

    def __init__(self, path: Path) -> None:
        with Image.open(path) as image:
            self.format = f"pillow:{(image.format or 'image').lower()}"
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                self.pixels = on_white(np.asarray(image.convert("RGBA")))
            else:
                self.pixels = np.asarray(image.convert("RGB"))
        h, w = self.pixels.shape[:2]
        self.level_dimensions = [(w, h)]
        self.level_downsamples = [1.0]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        height, width = self.pixels.shape[:2]
        return paste(lambda x0, y0, x1, y1: self.pixels[y0:y1, x0:x1].copy(), width, height, x, y, w, h)


def _corrupt(path: Path, error: BaseException) -> WsisegError:
    detail = re.sub(r"\s+", " ", str(error)).strip() or type(error).__name__
    return WsisegError(
        f"{path.name} is corrupt or unreadable ({detail}); check the file or re-export it"
    )


def _dicom_file(folder: Path) -> Path:
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise WsisegError(f"{folder} is a folder, not a slide: pass a slide file (or a folder of DICOM .dcm files)")
    return files[0]


def _open_any(path: Path) -> Backend:
    with open(path, "rb") as handle:
        is_tiff = handle.read(4) in TIFF_MAGICS
    if is_tiff:
        try:
            with tifffile.TiffFile(str(path)) as tif:
                is_ome = tif.is_ome
        except (tifffile.TiffFileError, ValueError, OSError, IndexError) as error:
            raise _corrupt(path, error) from None
        if is_ome:
            return TiffBackend(path)
    vendor = openslide.OpenSlide.detect_format(str(path))
    if vendor is not None:
        try:
            return OpenSlideBackend(path)
        except openslide.OpenSlideError as error:
            if not is_tiff:
                raise _corrupt(path, error) from None
    if is_tiff:
        return TiffBackend(path)
    try:
        return ImageBackend(path)
    except UnidentifiedImageError:
        raise WsisegError(
            f"{path.name} is not a slide or image wsiseg can read (OpenSlide formats, TIFF/OME-TIFF, PNG, JPEG); "
            "check the path"
        ) from None


def open_backend(path: Path) -> Backend:
    """Open the right reader for `path` and prove it can decode pixels, or raise a one-line WsisegError."""
    path = Path(path)
    if not path.exists():
        raise WsisegError(f"no such slide file: {path}; check the path")
    if path.is_dir():
        path = _dicom_file(path)
    backend: Backend | None = None
    try:
        backend = _open_any(path)
        last = len(backend.level_dimensions) - 1
        w, h = backend.level_dimensions[last]
        backend.read(last, 0, 0, min(w, 16), min(h, 16))
    except Exception as error:  # noqa: BLE001 - any decoder failure on user input is a corrupt file
        if backend is not None:
            with suppress(Exception):
                backend.close()
        if isinstance(error, WsisegError):
            raise
        raise _corrupt(path, error) from None
    return backend
