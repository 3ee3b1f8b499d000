"""The tile store: a zarr 3 / OME-Zarr 0.5 image of a slide at one MPP, holding only its tissue tiles.

Layout of `NAME.zarr` (only zarr objects, so zarr opens it without warnings):
  zarr.json   attributes `ome` (OME-Zarr 0.5 multiscales, axes c, y, x, scale = MPP in micrometre,
              translation = the slide position in micrometre) and `wsiseg` (mpp, size, tile grid,
              origin, source slide, tissue, `complete`)
  0/          uint8 (3, height, width), one chunk per tile, no shards, fill value 255 (white):
              chunks of background tiles are never written
  1/, 2/ ...  the pyramid, written when the tiles are: each level the 2x2 mean of the previous
              (halving rounded up, as mask stores do), until both sides fit 128 px
  tissue/     uint8 (rows, cols) tissue mask over the slide, at `wsiseg.tissue.mpp`
  labels/     (once `wsiseg export --format labels` ran) OME-Zarr label images of this image
Beside it: `NAME.qc.png` (thumbnail with the tissue outline and the tissue tiles) and
`NAME.tile.log`.
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from PIL import Image

from wsiseg.errors import WsisegError
from wsiseg.outputs import TEMPORARY_GLOB, atomic_file
from wsiseg.slide.backends import Bounds
from wsiseg.slide.grid import Frame, Grid
from wsiseg.slide.mask import TissueMask
from wsiseg.store.masks import level_datasets, level_shapes

if TYPE_CHECKING:
    from wsiseg.slide.reader import Slide

FORMAT_VERSION = 1
IMAGE = "0"
TISSUE = "tissue"
QC_SUFFIX = ".qc.png"
LOG_SUFFIX = ".tile.log"
PYRAMID_METADATA = {
    "description": "each level the 2x2 block mean of the previous (rounded; edge pixels repeated at odd sizes)",
    "method": "wsiseg.store.tiles.mean_downsample",
}


def sidecar(store_path: Path, suffix: str) -> Path:
    """A file that belongs to a store but lives beside it (zarr warns about other files inside): a.zarr -> a.qc.png."""
    store_path = Path(store_path)
    name = store_path.name
    return store_path.with_name((name[: -len(".zarr")] if name.endswith(".zarr") else name) + suffix)


def ome_attributes(name: str, mpp: float, origin_um: tuple[float, float], levels: int = 1) -> dict[str, Any]:
    """OME-Zarr 0.5 `ome` attribute of a (c, y, x) image pyramid at `mpp` with `levels` levels."""
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": level_datasets(levels, mpp, origin_um, channels=True),
                "type": "mean",
                "metadata": PYRAMID_METADATA,
            }
        ],
        "omero": {
            "channels": [
                {"label": label, "color": color, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                for label, color in (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))
            ],
            "rdefs": {"model": "color"},
        },
    }


def attrs_frame(attributes: dict[str, Any]) -> Frame:
    """The frame of a tile store's image, from its `wsiseg` attributes (or the settings they are made of)."""
    return Frame(
        int(attributes["width"]), int(attributes["height"]), float(attributes["mpp"]),
        float(attributes["slide_mpp"]), tuple(attributes["origin"]),  # type: ignore[arg-type]
    )


def create_store(path: Path, settings: dict[str, Any], tissue: TissueMask) -> TileStore:
    """Create an empty, incomplete tile store at `path` (whose parent must exist)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    width, height, tile = settings["width"], settings["height"], settings["tile"]
    group.create_array(
        IMAGE,
        shape=(3, height, width),
        chunks=(3, tile, tile),
        dtype="uint8",
        fill_value=255,
        compressors=None,
        dimension_names=("c", "y", "x"),
    )
    mask = group.create_array(
        TISSUE, shape=tissue.mask.shape, chunks=tissue.mask.shape, dtype="uint8", fill_value=0,
        dimension_names=("y", "x"),
    )
    mask[...] = tissue.mask.astype(np.uint8)
    attributes = {
        "ome": ome_attributes(Path(settings["source"]).name, settings["mpp"], attrs_frame(settings).origin_um),
        "wsiseg": {**settings, "kind": "tiles", "format_version": FORMAT_VERSION, "complete": False},
    }
    group.attrs.update(attributes)
    return TileStore(path)


class TileStore:
    """Read access to a tile store: metadata, tissue mask and pixels (white where nothing is stored).

    It reads like a Slide at its one MPP (`read(x, y, w, h, mpp)`), so later steps can run from the
    store alone. Pickles by path.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
            self.attrs: dict[str, Any] = dict(group.attrs["wsiseg"])  # type: ignore[arg-type]
        except (FileNotFoundError, KeyError, ValueError, zarr.errors.NodeNotFoundError) as error:
            raise WsisegError(f"{self.path} is not a wsiseg tile store ({error}); create one with `wsiseg tile`") from None
        if self.attrs.get("kind") != "tiles":
            raise WsisegError(f"{self.path} is not a wsiseg tile store; create one with `wsiseg tile`")
        self._array: zarr.Array | None = None
        self._levels: dict[int, zarr.Array | None] = {}
        self.glass_from_source = False  # read cells without a tile from the source slide (see with_glass_from_source)
        self._slide: Slide | None = None
        self._tissue_cells: set[tuple[int, int]] | None = None

    @classmethod
    def open(cls, path: str | Path) -> TileStore:
        """Open an existing store (complete or not: see `is_complete`)."""
        return cls(path)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "attrs": self.attrs, "glass_from_source": self.glass_from_source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.attrs, self._array, self._levels = state["path"], state["attrs"], None, {}
        self.glass_from_source, self._slide, self._tissue_cells = state.get("glass_from_source", False), None, None

    def source_slide(self) -> Slide | None:
        """The slide the store was tiled from, opened, when it is still there with the size it had; else None."""
        from wsiseg.slide import open_slide

        if not self.source.is_file():
            return None
        try:
            slide = open_slide(self.source, self.slide_mpp)
        except WsisegError:
            return None
        if list(slide.level_dimensions[0]) != list(self.attrs.get("slide_dimensions", [])):
            slide.close()
            return None
        return slide

    def with_glass_from_source(self) -> TileStore:
        """This store reading the cells no tile was stored for (glass) from its source slide, so a run sees
        the pixels a run on the slide sees; the store itself (white there) when the slide is gone or changed."""
        slide = self.source_slide()
        if slide is None:
            return self
        slide.close()
        store = TileStore(self.path)
        store.glass_from_source = True
        return store

    def __repr__(self) -> str:
        return f"TileStore({str(self.path)!r}, {self.width}x{self.height} at {self.mpp} MPP)"

    @property
    def array(self) -> zarr.Array:
        """The (3, height, width) uint8 image array."""
        if self._array is None:
            self._array = zarr.open_array(str(self.path / IMAGE), mode="r")
        return self._array

    def pyramid_level(self, level: int) -> zarr.Array | None:
        """Level `level` (>= 1) of the image pyramid, None where the store has none (stores tiled before it)."""
        if level not in self._levels:
            try:
                self._levels[level] = zarr.open_array(str(self.path / str(level)), mode="r")
            except (FileNotFoundError, zarr.errors.NodeNotFoundError):
                self._levels[level] = None
        return self._levels[level]

    # --- metadata --------------------------------------------------------------------------
    mpp = property(lambda self: float(self.attrs["mpp"]), doc="MPP of the stored image.")
    width = property(lambda self: int(self.attrs["width"]))
    height = property(lambda self: int(self.attrs["height"]))
    tile = property(lambda self: int(self.attrs["tile"]))
    source = property(lambda self: Path(self.attrs["source"]), doc="The slide the store was made from.")
    slide_mpp = property(lambda self: float(self.attrs["slide_mpp"]), doc="Base MPP of the source slide.")
    origin = property(lambda self: tuple(self.attrs["origin"]), doc="Bounds origin (x, y) in level-0 pixels.")
    is_complete = property(lambda self: bool(self.attrs.get("complete")))
    qc_picture = property(lambda self: sidecar(self.path, QC_SUFFIX), doc="The QC picture beside the store.")

    @property
    def slide_frame(self) -> Frame:
        """The source slide's bounds at its own resolution (level 0)."""
        return Frame.over(self.bounds, self.slide_mpp)

    @property
    def tissue(self) -> TissueMask:
        array = zarr.open_array(str(self.path / TISSUE), mode="r")
        return TissueMask(np.asarray(array[...]) > 0, float(self.attrs["tissue"]["mpp"]))

    @property
    def grid(self) -> Grid:
        """The chunk grid: one tile per chunk, partial tiles at the right and bottom edges."""
        return Grid(self.width, self.height, self.tile, self.tile, clamp=False)

    def size_at(self, mpp: float) -> tuple[int, int]:
        """(width, height): the store exists at its own MPP only."""
        self._check_mpp(mpp)
        return self.width, self.height

    def _check_mpp(self, mpp: float | None) -> None:
        if mpp is not None and not math.isclose(mpp, self.mpp, rel_tol=1e-6):
            raise WsisegError(
                f"tile store {self.path.name} holds the slide at {self.mpp:g} MPP, not {mpp:g}: "
                f"run at --mpp {self.mpp:g} or tile the slide again at {mpp:g}"
            )

    # --- pixels ----------------------------------------------------------------------------
    def read(self, x: int, y: int, width: int, height: int, mpp: float | None = None) -> np.ndarray:
        """RGB uint8 (height, width, 3) of a box of the stored image; white outside it, and where no tile was stored
        (the source slide's pixels there with `glass_from_source`)."""
        self._check_mpp(mpp)
        out = read_box(self.array, x, y, width, height)
        if self.glass_from_source:
            self._read_glass(out, x, y)
        return out

    def _read_glass(self, out: np.ndarray, x: int, y: int) -> None:
        """Fill the parts of the box `out` (at x, y) that lie in cells without a tile from the source slide."""
        height, width = out.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, self.width), min(y + height, self.height)
        if self._tissue_cells is None:
            self._tissue_cells = set(self.tissue_tiles())
        for top in range(y0 // self.tile * self.tile, y1, self.tile):
            for left in range(x0 // self.tile * self.tile, x1, self.tile):
                if (left, top) in self._tissue_cells:
                    continue
                if self._slide is None:
                    self._slide = self.source_slide()
                    if self._slide is None:
                        raise WsisegError(f"the source slide of {self.path.name} ({self.source}) changed during the run")
                bx0, by0 = max(left, x0), max(top, y0)
                bx1, by1 = min(left + self.tile, x1), min(top + self.tile, y1)
                out[by0 - y : by1 - y, bx0 - x : bx1 - x] = self._slide.read(bx0, by0, bx1 - bx0, by1 - by0, self.mpp)

    def read_coarse(self, x: int, y: int, width: int, height: int, factor: float) -> np.ndarray:
        """A box of the stored image from the coarsest pyramid level at least as fine as `factor` x its MPP
        (downsample 2^L <= factor): about (height, width) / 2^L pixels; at full size (`read`) without a pyramid."""
        level, array = 0, self.array
        while 2 ** (level + 1) <= factor and (coarser := self.pyramid_level(level + 1)) is not None:
            level, array = level + 1, coarser
        if level == 0:  # a full-size read reads as `read` does (the source's glass with `glass_from_source`)
            return self.read(x, y, width, height)
        scale = 2**level
        return read_box(array, round(x / scale), round(y / scale), max(1, round(width / scale)),
                        max(1, round(height / scale)))

    @property
    def bounds(self) -> Bounds:
        """The source slide's bounds (level-0 pixels) that the store covers."""
        (x, y), (w, h) = self.attrs["origin"], self.attrs["slide_size"]
        return Bounds(int(x), int(y), int(w), int(h))

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The stored image with its longer side `max_side`, read one row of tiles at a time."""
        factor = max(self.width, self.height) / max_side
        width, height = max(1, round(self.width / factor)), max(1, round(self.height / factor))
        out = np.empty((height, width, 3), np.uint8)
        for y in range(0, self.height, self.tile):
            y0, y1 = round(y / factor), round(min(y + self.tile, self.height) / factor)
            if y1 > y0:
                stripe = Image.fromarray(self.read(0, y, self.width, min(self.tile, self.height - y)))
                out[y0:y1] = np.asarray(stripe.resize((width, y1 - y0), Image.Resampling.BOX))
        return out

    def close(self) -> None:
        """Forget the open arrays and close the source slide (they reopen on the next read)."""
        self._array, self._levels = None, {}
        if self._slide is not None:
            self._slide.close()
            self._slide = None

    def __enter__(self) -> TileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- chunks ----------------------------------------------------------------------------
    def chunk_file(self, x: int, y: int) -> Path:
        """Where the tile at pixel (x, y) (a chunk corner) is stored."""
        key = self.array.metadata.encode_chunk_key((0, y // self.tile, x // self.tile))
        return self.path / IMAGE / key

    def stored_tiles(self, positions: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The positions whose chunk file is there, whole (chunks are written through a temporary name)."""
        size = 3 * self.tile * self.tile
        stored = []
        for x, y in positions:
            chunk = self.chunk_file(x, y)
            if chunk.is_file() and chunk.stat().st_size == size:
                stored.append((x, y))
        return stored

    def remove_temporaries(self) -> None:
        """Delete temporary chunk files a killed writer left behind."""
        for temporary in (self.path / IMAGE).rglob(TEMPORARY_GLOB):
            temporary.unlink()

    def tissue_tiles(self) -> list[tuple[int, int]]:
        """Positions of the tiles holding tissue: the ones a complete store has written."""
        return self.grid.tissue_positions(self.tissue, self.mpp)


def read_box(array: zarr.Array, x: int, y: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 (height, width, 3) of a box of a (3, H, W) image array; white outside it."""
    out = np.full((height, width, 3), 255, np.uint8)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, array.shape[2]), min(y + height, array.shape[1])
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = np.asarray(array[:, y0:y1, x0:x1]).transpose(1, 2, 0)
    return out


class ChunkWriter:
    """Writes tiles of a store's image, each into its own chunk file, atomically (temporary name, rename).

    Concurrent writers never touch the same file, and a killed writer leaves either no chunk or a
    whole one (never a cut one), so resuming only needs to look at which chunk files exist.
    """

    def __init__(self, array_path: str | Path) -> None:
        self.root = Path(array_path)
        metadata = zarr.open_array(str(self.root), mode="r").metadata
        if [codec.to_dict()["name"] for codec in metadata.codecs] != ["bytes"] or metadata.dtype.to_native_dtype() != np.uint8:
            raise ValueError(f"{self.root} is not an uncompressed uint8 tile array")
        self.encode_key = metadata.chunk_key_encoding.encode_chunk_key
        self.channels, self.tile, _ = metadata.chunk_grid.chunk_shape  # type: ignore[attr-defined]

    def write(self, x: int, y: int, planar: np.ndarray) -> None:
        """Store (3, h, w) `planar` pixels as the chunk whose corner is (x, y); the rest of the chunk is white."""
        _, height, width = planar.shape
        if (height, width) == (self.tile, self.tile) and planar.flags.c_contiguous:
            chunk = planar
        else:
            chunk = np.full((self.channels, self.tile, self.tile), 255, np.uint8)
            chunk[:, :height, :width] = planar
        target = self.root / self.encode_key((0, y // self.tile, x // self.tile))
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as temporary, open(temporary, "wb") as handle:
            handle.write(chunk.data)


def mean_downsample(planar: np.ndarray) -> np.ndarray:
    """Halve a (C, H, W) uint8 image by the rounded mean of 2x2 blocks (rounding sizes up, edge pixels repeated)."""
    _, height, width = planar.shape
    if height % 2 or width % 2:
        planar = np.pad(planar, ((0, 0), (0, height % 2), (0, width % 2)), mode="edge")
    total = planar[:, 0::2, 0::2].astype(np.uint16) + planar[:, 0::2, 1::2] + planar[:, 1::2, 0::2] + planar[:, 1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint8)


def write_pyramid(path: Path) -> int:
    """Write levels 1.. of a tile store's image (the shapes of a mask store's levels) and their OME metadata."""
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    attributes = dict(group.attrs["wsiseg"])  # type: ignore[arg-type]
    tile = int(attributes["tile"])
    shapes = level_shapes(int(attributes["height"]), int(attributes["width"]))
    for level in range(1, len(shapes)):
        previous = group[str(level - 1)]
        array = group.create_array(
            str(level), shape=(3, *shapes[level]), chunks=(3, tile, tile), dtype="uint8", fill_value=255,
            overwrite=True, dimension_names=("c", "y", "x"),
        )
        for y in range(0, shapes[level][0], tile):
            array[:, y : y + tile] = mean_downsample(np.asarray(previous[:, 2 * y : 2 * (y + tile)]))[:, :, : shapes[level][1]]
    ome = dict(group.attrs["ome"])  # type: ignore[arg-type]
    multiscale = dict(ome["multiscales"][0])
    frame = attrs_frame(attributes)
    multiscale.update(
        datasets=level_datasets(len(shapes), frame.mpp, frame.origin_um, channels=True),
        type="mean", metadata=PYRAMID_METADATA,
    )
    group.attrs["ome"] = {**ome, "multiscales": [multiscale]}
    return len(shapes)


def mark_complete(path: Path) -> None:
    """Write the completion marker: the last write of a tiling run."""
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    attributes = dict(group.attrs["wsiseg"])  # type: ignore[arg-type]
    attributes["complete"] = True
    group.attrs["wsiseg"] = attributes


# Worker side: kept in this light module so dask workers import no tissue-detection code.
class SlideCache:
    """A few open slides per worker process, reused across tasks; the least recently used is dropped
    and closed (once no task still reads it). A file replaced at the same path is a new entry."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.slides: OrderedDict[tuple[Any, ...], Slide] = OrderedDict()
        self.users: Counter[int] = Counter()
        self.lock = threading.Lock()

    @staticmethod
    def key(slide: Slide) -> tuple[Any, ...]:
        try:
            stat = os.stat(slide.path)
        except OSError:
            return (str(slide.path), slide.slide_mpp)
        return (str(slide.path), slide.slide_mpp, stat.st_mtime_ns, stat.st_size)

    @contextmanager
    def use(self, slide: Slide) -> Iterator[Slide]:
        """The cached handle for `slide` (or `slide` itself, now cached) while a task reads it."""
        key = self.key(slide)
        with self.lock:
            cached = self.slides.pop(key, slide)
            self.slides[key] = cached
            self.users[id(cached)] += 1
            dropped = []
            while len(self.slides) > self.size:
                _, old = self.slides.popitem(last=False)
                if not self.users[id(old)]:
                    dropped.append(old)
        for old in dropped:
            old.close()
        try:
            yield cached
        finally:
            with self.lock:
                self.users[id(cached)] -= 1
                idle = not self.users[id(cached)]
                if idle:
                    del self.users[id(cached)]
                evicted = idle and all(s is not cached for s in self.slides.values())
            if evicted:
                cached.close()


_WORKER_SLIDES = SlideCache()


def write_tiles(
    slide: Slide, array_path: str, shape: tuple[int, int, int], mpp: float, tile: int, positions: list[tuple[int, int]]
) -> int:
    """Read tiles at `mpp` and write each into its own chunk (so concurrent tasks never share one)."""
    writer = ChunkWriter(array_path)  # per call: a store re-created with another tile size gets the right chunk keys
    _, height, width = shape
    with _WORKER_SLIDES.use(slide) as reader:
        for x, y in positions:
            writer.write(x, y, reader.read_planar(x, y, min(tile, width - x), min(tile, height - y), mpp))
    return len(positions)
