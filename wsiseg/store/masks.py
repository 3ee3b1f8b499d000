"""MaskStore: a label mask as an OME-Zarr 0.5 label image with a pyramid, written row stripe by row stripe.

Layout of `mask.zarr` (Zarr v3):
- arrays "0", "1", ...: the label pyramid, level 0 at the segmentation MPP, each next level
  half the size, downsampled by the mode of 2x2 blocks (never by averaging);
- optional array "probabilities": (K, H, W) float16 blended scores at level 0;
- group attributes `ome` (version 0.5, `multiscales`, `image-label` with colours and class
  names as properties) and `wsiseg` (MPP, source, origin, class names, per-class pixel
  counts, `complete`).
Rows are written in whole chunk rows; the rows written so far are recorded in
`progress.json` (replaced atomically) so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.errors import WsisegError
from wsiseg.outputs import atomic_file
from wsiseg.slide.grid import Frame
from wsiseg.store.chunk_files import ChunkFiles

PROGRESS_FILE = "progress.json"
LABELS_GROUP = "labels"
LEVEL_MIN_SIZE = 128  # keep halving until both sides fit this
# colours of labels 1.. when the predictor names none (label 0 is the first entry); the first
# ones are those that stand out on H&E (no pinks or purples, which vanish on eosin and haematoxylin)
PALETTE = [
    (0, 0, 0), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (70, 240, 240),
    (230, 25, 75), (145, 30, 180), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
    (255, 215, 180), (0, 0, 128), (128, 128, 128),
]


def default_colors(count: int) -> list[tuple[int, int, int]]:
    """Distinct RGB colours for labels 0..count-1 (black for 0)."""
    colors = list(PALETTE)
    rng = np.random.default_rng(0)
    while len(colors) < count:
        colors.append(tuple(int(v) for v in rng.integers(40, 256, 3)))
    return colors[:count]


def mode_downsample(labels: np.ndarray) -> np.ndarray:
    """Halve a label image by the most frequent label of each 2x2 block (ties: the top-left one)."""
    height, width = labels.shape
    if height % 2 or width % 2:
        labels = np.pad(labels, ((0, height % 2), (0, width % 2)), mode="edge")
    a, b = labels[0::2, 0::2], labels[0::2, 1::2]
    c, d = labels[1::2, 0::2], labels[1::2, 1::2]
    count_a = 1 + (a == b).astype(np.uint8) + (a == c) + (a == d)
    count_b = 1 + (b == c).astype(np.uint8) + (b == d)
    count_c = 1 + (c == d).astype(np.uint8)
    out = a.copy()
    best = count_a.copy()
    for candidate, count in ((b, count_b), (c, count_c)):
        better = count > best
        out[better] = candidate[better]
        best[better] = count[better]
    return out


def level_shapes(height: int, width: int, min_size: int = LEVEL_MIN_SIZE) -> list[tuple[int, int]]:
    """Shapes of the pyramid levels: halving (rounding up) until both sides fit `min_size`."""
    shapes = [(height, width)]
    while max(shapes[-1]) > min_size:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def level_datasets(levels: int, mpp: float, origin_um: tuple[float, float], channels: bool) -> list[dict[str, Any]]:
    """OME-Zarr `datasets` of a power-of-two pyramid: level L has pixels of 2^L x `mpp`, centred on the level-0 pixels it covers."""
    datasets = []
    for level in range(levels):
        size = mpp * 2**level
        shift = (size - mpp) / 2  # pixel centres: level L's first one sits between level 0's first 2^L
        scale, translation = [size, size], [origin_um[1] + shift, origin_um[0] + shift]
        if channels:
            scale, translation = [1.0, *scale], [0.0, *translation]
        datasets.append({
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": scale}, {"type": "translation", "translation": translation},
            ],
        })
    return datasets


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Pixels of each class: a vectorised comparison per class when they are few (bincount widens to int64 first)."""
    if num_classes <= 16:
        return [int(np.count_nonzero(labels == k)) for k in range(num_classes)]
    return np.bincount(labels.reshape(-1), minlength=num_classes).tolist()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary sibling, then rename it over `path`."""
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(data))


class MaskStore:
    """A label mask at one MPP with its pyramid, class names and colours (see the module doc)."""

    def __init__(self, path: Path, group: Any) -> None:
        self.path = Path(path)
        self.group = group
        meta = dict(group.attrs["wsiseg"])
        self.meta = meta
        self.width: int = meta["width"]
        self.height: int = meta["height"]
        self.mpp: float = meta["mpp"]
        self.class_names: list[str] = list(meta["class_names"])
        self.colors: list[tuple[int, int, int]] = [tuple(c) for c in meta["colors"]]
        self.chunk: int = meta["chunk"]
        self.background: int = meta.get("background", 0)
        self._buffer: list[np.ndarray] = []
        self._prob_buffer: list[np.ndarray] = []
        self._buffered_rows = 0
        self._chunk_files: ChunkFiles | bool | None = None  # level 0's chunk files where zarr is bypassed (False: never)
        progress = self._read_progress()
        self.rows_done: int = progress["rows_done"]
        self.pixel_counts: list[int] = progress["pixel_counts"]

    # ---- creating and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        frame: Frame,
        class_names: Sequence[str],
        colors: Sequence[Sequence[int]] | None = None,
        source: str | None = None,
        probabilities: bool = False,
        background: int = 0,
        chunk: int = 512,
        params: dict[str, Any] | None = None,
    ) -> MaskStore:
        """A new, empty store at `path` (any old content there is removed) of the image `frame` describes."""
        import zarr

        from wsiseg.outputs import remove

        path = Path(path)
        remove(path)
        num_classes = len(class_names)
        colors = [tuple(int(v) for v in c[:3]) for c in (colors or default_colors(num_classes))]
        dtype = "uint8" if num_classes <= 255 else "uint16"
        width, height, origin = frame.width, frame.height, frame.origin
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        group.create_array(
            "0", shape=(height, width), chunks=(chunk, chunk), dtype=dtype, fill_value=0, dimension_names=("y", "x")
        )
        if probabilities:
            group.create_array(
                "probabilities", shape=(num_classes, height, width), chunks=(num_classes, chunk, chunk),
                dtype="float16", fill_value=0, dimension_names=("c", "y", "x"),
            )
        group.attrs["wsiseg"] = {
            "width": int(width), "height": int(height), "mpp": float(frame.mpp),
            "class_names": list(class_names), "colors": [list(c) for c in colors],
            "source": source, "slide_mpp": frame.slide_mpp, "origin": [int(origin[0]), int(origin[1])],
            "background": int(background), "chunk": chunk, "params": params or {}, "complete": False,
        }
        _write_json_atomic(path / PROGRESS_FILE, {"rows_done": 0, "pixel_counts": [0] * num_classes})
        return cls(path, group)

    @classmethod
    def open(cls, path: Path) -> MaskStore:
        """Open an existing store (complete or not)."""
        import zarr

        path = Path(path)
        if not path.is_dir():
            raise WsisegError(f"mask store {path} does not exist: give the mask.zarr written by `wsiseg segment`")
        try:
            group = zarr.open_group(str(path), mode="r+")
            group.attrs["wsiseg"]
        except Exception:
            raise WsisegError(f"{path} is not a wsiseg mask store: give the mask.zarr written by `wsiseg segment`") from None
        return cls(path, group)

    @classmethod
    def resume_or_create(cls, path: Path, params: dict[str, Any], frame: Frame, **create_args: Any) -> MaskStore:
        """Reopen a store left by an interrupted run with the same `params`, else create a new one
        (`create` of `frame` with `create_args`)."""
        path = Path(path)
        if path.is_dir():
            try:
                store = cls.open(path)
            except WsisegError:
                store = None
            if store is not None and store.meta.get("params") == params:
                for leftover in path.rglob(".*.partial*"):  # a chunk file a killed run was writing
                    leftover.unlink()
                return store
        return cls.create(path, frame, params=params, **create_args)

    def _read_progress(self) -> dict[str, Any]:
        progress_path = self.path / PROGRESS_FILE
        if progress_path.exists():
            return json.loads(progress_path.read_text())
        done = self.height if self.meta.get("complete") else 0
        return {"rows_done": done, "pixel_counts": self.meta.get("pixel_counts", [0] * len(self.class_names))}

    # ---- properties -----------------------------------------------------------------------

    @property
    def is_complete(self) -> bool:
        """True once every row and the pyramid are written."""
        return bool(self.meta.get("complete"))

    @property
    def num_levels(self) -> int:
        """Number of pyramid levels written."""
        return len(self.meta.get("levels", [])) or 1

    def level(self, index: int = 0) -> Any:
        """The zarr array of pyramid level `index`."""
        return self.group[str(index)]

    @property
    def probabilities(self) -> Any | None:
        """The (K, H, W) float16 score array, if the run saved one."""
        return self.group["probabilities"] if "probabilities" in self.group else None

    @property
    def source(self) -> str | None:
        """The slide or tile store the mask was made from."""
        return self.meta.get("source")

    @property
    def slide_mpp(self) -> float | None:
        """Base MPP of the source slide (for slide-pixel coordinates)."""
        return self.meta.get("slide_mpp")

    @property
    def origin(self) -> tuple[int, int]:
        """The source slide's bounds origin in its level-0 pixels."""
        return tuple(self.meta.get("origin", (0, 0)))  # type: ignore[return-value]

    @property
    def frame(self) -> Frame:
        """Where the mask's level-0 pixels lie on the source slide (a mask without a slide is its own level 0)."""
        return Frame(self.width, self.height, self.mpp, self.slide_mpp or self.mpp, self.origin)

    def class_areas_mm2(self) -> dict[str, float]:
        """Area of every class in mm² (pixel count x MPP²)."""
        pixel_area = (self.mpp / 1000.0) ** 2
        return {name: count * pixel_area for name, count in zip(self.class_names, self.pixel_counts)}

    def read(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """Labels of a box of a pyramid level (zero outside the mask)."""
        array = self.level(level)
        out = np.zeros((height, width), dtype=array.dtype)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, array.shape[1]), min(y + height, array.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = array[y0:y1, x0:x1]
        return out

    # ---- writing --------------------------------------------------------------------------

    def write_rows(self, y0: int, labels: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        """Take the next finished rows (top to bottom, starting at `rows_done` + buffered rows)."""
        expected = self.rows_done + self._buffered_rows
        if y0 != expected:
            raise ValueError(f"rows must arrive in order: got row {y0}, expected {expected}")
        self._buffer.append(labels.astype(self.level(0).dtype, copy=False))
        if probabilities is not None and self.probabilities is not None:
            self._prob_buffer.append(probabilities.astype(np.float16))
        self._buffered_rows += labels.shape[0]
        while self._buffered_rows >= self.chunk or (
            self._buffered_rows and self.rows_done + self._buffered_rows >= self.height
        ):
            self._flush(min(self.chunk, self._buffered_rows))

    def _flush(self, rows: int) -> None:
        block = np.concatenate(self._buffer, axis=0)
        self._buffer = [block[rows:]] if block.shape[0] > rows else []
        block = block[:rows]
        y0 = self.rows_done
        if self._chunk_files is None:
            self._chunk_files = ChunkFiles.of(self.level(0)) or False
        if not (self._chunk_files and self._chunk_files.write_row(y0, block)):
            self.level(0)[y0 : y0 + rows] = block
        if self._prob_buffer:
            scores = np.concatenate(self._prob_buffer, axis=1)
            self._prob_buffer = [scores[:, rows:]] if scores.shape[1] > rows else []
            self.probabilities[:, y0 : y0 + rows] = scores[:, :rows]
        counts = class_counts(block, len(self.class_names))
        self.pixel_counts = [int(a) + int(b) for a, b in zip(self.pixel_counts, counts)]
        self._buffered_rows -= rows
        self.rows_done = y0 + rows
        _write_json_atomic(self.path / PROGRESS_FILE, {"rows_done": self.rows_done, "pixel_counts": self.pixel_counts})

    def finish(self) -> None:
        """Build the pyramid, write the OME metadata and mark the store complete."""
        if self.rows_done < self.height:
            raise ValueError(f"only {self.rows_done} of {self.height} rows were written")
        shapes = level_shapes(self.height, self.width)
        for index in range(1, len(shapes)):
            self._build_level(index, shapes[index])
        meta = dict(self.meta)
        meta.update(complete=True, pixel_counts=self.pixel_counts, levels=[list(s) for s in shapes])
        self.group.attrs["ome"] = self._ome_metadata(len(shapes))
        self.group.attrs["wsiseg"] = meta
        self.meta = meta
        (self.path / PROGRESS_FILE).unlink(missing_ok=True)

    def _build_level(self, index: int, shape: tuple[int, int]) -> None:
        previous = self.level(index - 1)
        chunk = self.chunk
        array = self.group.create_array(
            str(index), shape=shape, chunks=(chunk, chunk), dtype=previous.dtype, fill_value=0, overwrite=True,
            dimension_names=("y", "x"),
        )
        for y in range(0, shape[0], chunk):
            array[y : y + chunk] = mode_downsample(np.asarray(previous[2 * y : 2 * (y + chunk)]))[:, : shape[1]]

    def write_into_image(self, label_path: Path, overwrite: bool = False) -> Path:
        """Copy the label pyramid to `IMAGE/labels/NAME` (`label_path`), the spec's place for an image's labels.

        IMAGE must be an OME-Zarr image whose levels have the shapes of this mask's levels (a tile
        store the mask was segmented from); the label image is written under a partial name,
        then renamed, and NAME is added to the `labels` group's list.
        """
        import zarr

        from wsiseg.outputs import check_writable, partial_path, publish, remove

        label_path = Path(label_path)
        image = label_path.parent.parent
        if label_path.parent.name != LABELS_GROUP:
            raise WsisegError(f"{label_path} is not in an image's {LABELS_GROUP}/ group: give IMAGE.zarr/labels/NAME")
        try:
            image_group = zarr.open_group(str(image), mode="r+", zarr_format=3)
            datasets = image_group.attrs["ome"]["multiscales"][0]["datasets"]  # type: ignore[index,call-overload]
            shapes = [tuple(image_group[d["path"]].shape[-2:]) for d in datasets]  # type: ignore[union-attr]
        except Exception:
            raise WsisegError(f"{image} is not an OME-Zarr image: give the tile store the mask was made from") from None
        mine = [tuple(self.level(index).shape) for index in range(self.num_levels)]
        if shapes != mine:
            raise WsisegError(
                f"{image.name} has levels {shapes}, the mask {mine}: labels go into the tile store the mask was segmented from"
            )
        check_writable(label_path, overwrite)
        labels = image_group.require_group(LABELS_GROUP)
        partial = partial_path(label_path)
        remove(partial)
        group = zarr.open_group(str(partial), mode="w", zarr_format=3)
        for index, shape in enumerate(mine):
            source = self.level(index)
            array = group.create_array(
                str(index), shape=shape, chunks=(self.chunk, self.chunk), dtype=source.dtype, fill_value=0,
                dimension_names=("y", "x"),
            )
            for y in range(0, shape[0], self.chunk):
                array[y : y + self.chunk] = source[y : y + self.chunk]
        group.attrs["ome"] = self._ome_metadata(len(mine), parent_image="../../")
        group.attrs["wsiseg"] = self.meta
        publish(partial, label_path)
        names = [name for name in labels.attrs.get("ome", {}).get("labels", []) if name != label_path.name]
        labels.attrs["ome"] = {"version": "0.5", "labels": [*names, label_path.name]}
        return label_path

    def _ome_metadata(self, levels: int, parent_image: str | None = None) -> dict[str, Any]:
        image_label: dict[str, Any] = {"version": "0.5"}
        if parent_image is not None:
            image_label["source"] = {"image": parent_image}
        return {
            "version": "0.5",
            "multiscales": [
                {
                    "name": "mask",
                    "axes": [
                        {"name": "y", "type": "space", "unit": "micrometer"},
                        {"name": "x", "type": "space", "unit": "micrometer"},
                    ],
                    "datasets": level_datasets(levels, self.mpp, self.frame.origin_um, channels=False),
                    "type": "mode",
                    "metadata": {
                        "description": "each level the most frequent label of 2x2 blocks of the previous "
                        "(ties: the top-left one; edge pixels repeated at odd sizes)",
                        "method": "wsiseg.store.masks.mode_downsample",
                    },
                }
            ],
            "image-label": {
                **image_label,
                "colors": [
                    {"label-value": label, "rgba": [*color, 0 if label == self.background else 255]}
                    for label, color in enumerate(self.colors)
                ],
                "properties": [
                    {"label-value": label, "class": name} for label, name in enumerate(self.class_names)
                ],
            },
        }
