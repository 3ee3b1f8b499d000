"""The slide loop shared by `segment` and `fseg`: windows in, a finished mask store and its exports out.

`run_slide` reads the tissue windows of a slide (or tile store), runs any predictor on them,
blends the scores in row stripes, writes label rows to the mask store as soon as they are
final, and at the end builds the pyramid, writes the exports and a summary. Everything is
built under partial names; finished chunk rows are recorded so an interrupted run resumes
where it stopped and produces identical output.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.engine.blend import BLEND_MODES, StripeBlender, StripeSink, window_weights
from wsiseg.engine.loader import parse_workers
from wsiseg.engine.predictors import BatchRunner, Predictor
from wsiseg.devices import resolve_device
from wsiseg.errors import WsisegError
from wsiseg.outputs import check_writable, finish_publish, partial_path, publish_together, remove
from wsiseg.progress import get_logger, log_to_file, progress_bar
from wsiseg.store.masks import MaskStore

log = get_logger("engine")

MODES = ("windowslide", "resize")
MASK_NAME = "mask.zarr"
SUMMARY_NAME = "summary.json"
LOG_NAME = "segment.log"
DEFAULT_EXPORTS = ("tiff", "ome-tiff", "png")
FORMAT_VERSION = 1


@dataclass
class SourceView:
    """What the loop needs of a slide or tile store, at the segmentation MPP."""

    reader: Any  # read(x, y, w, h, mpp) -> (h, w, 3) uint8
    path: Path
    kind: str  # "slide" or "tiles"
    width: int
    height: int
    slide_mpp: float
    origin: tuple[int, int]
    tissue_option: Any = "auto"  # --tissue: auto, all or a mask file
    _tissue: Any = field(default=None, init=False, repr=False, compare=False)

    def tissue(self) -> Any:
        """The tissue mask (TissueMask) `tissue_option` asks for, made once per view (a tile store's `auto`
        is the mask it was tiled with)."""
        if self._tissue is None:
            from wsiseg.slide.tissue import resolve_source_tissue

            self._tissue = resolve_source_tissue(self.tissue_option, self.reader, self.kind == "tiles")
        return self._tissue

    def thumbnail(self, max_side: int = 2048) -> np.ndarray | None:
        """An RGB overview for the overlay: the slide's, also for a tile store whose slide is still there."""
        from wsiseg.export.overlay import source_picture

        return source_picture(self.reader, max_side)


def is_tile_store(path: Path) -> bool:
    """Whether `path` is a zarr store written by `wsiseg tile`."""
    path = Path(path)
    if not (path.is_dir() and (path / "zarr.json").is_file()):
        return False
    try:
        attributes = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attributes.get("wsiseg", {}).get("kind") == "tiles"


def open_source(source: Any, mpp: float, slide_mpp: float | None = None, tissue: Any = "auto") -> SourceView:
    """A SourceView of a path (slide file or tile store), a Slide, a TileStore or a SourceView, at `mpp`.

    `tissue` is the --tissue option (auto, all or a mask file). A SourceView given keeps its tissue
    option and mask, which do not depend on `mpp`.
    """
    from wsiseg.slide import Slide, open_slide
    from wsiseg.store.tiles import TileStore

    if isinstance(source, SourceView):
        view = open_source(source.reader, mpp, slide_mpp, source.tissue_option)
        view._tissue = source._tissue
        return view
    if isinstance(source, (str, Path)):
        source = TileStore.open(source) if is_tile_store(Path(source)) else open_slide(source, slide_mpp)
    if isinstance(source, TileStore):
        width, height = source.size_at(mpp)
        return SourceView(source, source.path, "tiles", width, height, source.slide_mpp, tuple(source.origin), tissue)
    if isinstance(source, Slide):
        width, height = source.size_at(mpp)
        bounds = source.bounds
        return SourceView(source, source.path, "slide", width, height, source.mpp, (bounds.x, bounds.y), tissue)
    raise TypeError(f"cannot segment a {type(source).__name__}: give a slide path, Slide or TileStore")


def output_paths(out_dir: Path, exports: Sequence[str]) -> dict[str, Path]:
    """Final paths of every output of a run."""
    from wsiseg.export.mask import FORMATS

    paths = {"mask": out_dir / MASK_NAME, "summary": out_dir / SUMMARY_NAME}
    for fmt in exports:
        if fmt not in FORMATS:
            raise WsisegError(f"unknown export format {fmt!r}: use any of {', '.join(FORMATS)}")
        paths[fmt] = out_dir / FORMATS[fmt]
    return paths


def tissue_regions(tissue: Any, mpp: float, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x, y, w, h) at `mpp` of the connected tissue regions, top to bottom."""
    from scipy import ndimage

    labelled, count = ndimage.label(tissue.mask)
    factor = tissue.mpp / mpp
    boxes = []
    for rows, cols in ndimage.find_objects(labelled):
        x0, y0 = int(math.floor(cols.start * factor)), int(math.floor(rows.start * factor))
        x1 = min(int(math.ceil(cols.stop * factor)), width)
        y1 = min(int(math.ceil(rows.stop * factor)), height)
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1 - x0, y1 - y0))
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def resample_rows(scores: np.ndarray, out_height: int, out_width: int, row0: int, row1: int) -> np.ndarray:
    """Rows row0..row1 of `scores` (K, h, w) bilinearly resized to (out_height, out_width) (half-pixel centres)."""

    def axis(out_size: int, in_size: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = np.clip((np.arange(start, stop) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
        low = np.floor(position).astype(np.int64)
        return low, np.minimum(low + 1, in_size - 1), (position - low).astype(np.float32)

    y0, y1, wy = axis(out_height, scores.shape[1], row0, row1)
    x0, x1, wx = axis(out_width, scores.shape[2], 0, out_width)
    rows = scores[:, y0] * (1 - wy)[None, :, None] + scores[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def bound_heap_growth() -> None:
    """Serve every allocation over 1 MB by mmap, so freed stripe buffers go back to the system.

    glibc raises its mmap threshold after each large free, so the tens-of-MB temporaries of a
    long run end up kept in the heap: measured +600-1,100 MB of resident memory on 60,000-pixel
    slides, varying from run to run; with a fixed threshold it stays flat (no-op off glibc).
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        return


class BackgroundWriter:
    """Hands finished stripes to `write` in a thread, in order, so the device never waits on disk."""

    def __init__(self, write: Any, depth: int = 4) -> None:
        self.write = write
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="wsiseg-mask-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.write(*item)
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = error

    def __call__(self, *item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self) -> None:
        """Wait until every stripe is written; raise what the writer hit, if anything."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def check_tissue(view: SourceView, mask: Any, mpp: float) -> None:
    """A run without a single tissue window is a user error (never an empty "ok"), checked before any output."""
    where = f"{view.path.name} ({view.width}x{view.height} px)"
    if not mask.mask.any():
        raise WsisegError(f"no tissue found in {where}: check the image, or pass --tissue all or a mask file")
    if not mask.covers(0, 0, view.width, view.height, mpp):
        raise WsisegError(
            f"the tissue mask of {where} holds tissue only outside the image: check that the --tissue mask "
            "covers this image, or pass --tissue all"
        )


def tissue_clipped(sink: StripeSink, tissue: Any, mpp: float, width: int, background: int) -> StripeSink:
    """A stripe sink that gives the pixels outside the tissue mask the background label."""

    def write(y0: int, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        inside = tissue.sample_rows(y0, labels.shape[0], width, mpp)
        sink(y0, np.where(inside, labels, background), probabilities)

    return write


def _fingerprint(view: SourceView, settings: dict[str, Any], predictor: Predictor) -> dict[str, Any]:
    stat = view.path.stat() if view.path.is_file() else None
    return {
        "format_version": FORMAT_VERSION,
        "source": str(view.path.resolve()),
        "source_size": stat.st_size if stat else None,
        "source_mtime": stat.st_mtime if stat else None,
        "classes": list(predictor.class_names),
        **settings,
    }


def finished_run(out_dir: Path, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The summary of a finished run in `out_dir` with these settings (then nothing is left to do), else None.

    A publish an interrupted run left half done is completed first. A finished run with other
    settings is refused without `overwrite`; outputs without a summary (the completion marker)
    are leftovers of an interrupted run, replaced by this one.
    """
    if finish_publish(out_dir):
        log.info("completed the outputs an interrupted run left in %s", out_dir)
    marker = out_dir / SUMMARY_NAME
    if overwrite or not marker.is_file():
        return None
    try:
        summary = json.loads(marker.read_text())
    except ValueError:
        summary = {}
    if summary.get("fingerprint") == fingerprint:
        return summary
    raise WsisegError(
        f"{out_dir} already exists and holds a finished run with other settings: pass --overwrite to replace it, "
        "or choose another --out"
    )


def _predict_windows(
    view: SourceView,
    positions: list[tuple[int, int]],
    store: MaskStore,
    sink: StripeSink,
    predictor: Predictor,
    settings: dict[str, Any],
    device: Any,
    workers: int,
    batch_size: int,
    advance: Any,
) -> int:
    """Windowslide: blend every window from the first one still needed; returns windows run."""
    from wsiseg.engine.loader import iterate_batches

    window, mpp = settings["window"], settings["mpp"]
    start_row = store.rows_done
    first_needed = next((i for i, (_, y) in enumerate(positions) if y + window > start_row), len(positions))
    first_batch = first_needed // batch_size
    advance(first_batch * batch_size)
    writer = BackgroundWriter(sink)
    blender = StripeBlender(
        view.width, view.height, window, predictor.num_outputs, window_weights(window, settings["blend"]),
        writer, background=settings["background"], start_row=start_row, device=device,
        keep_probabilities=store.probabilities is not None,
    )
    runner = BatchRunner(predictor, batch_size)
    count = 0
    batches = iterate_batches(view.reader, positions, window, mpp, batch_size, workers, device, first_batch)
    try:
        for indices, batch in batches:
            scores = runner(batch)
            for index, score in zip(indices, scores):
                x, y = positions[index]
                blender.add(score, x, y)
            count += len(indices)
            advance(len(indices))
        blender.close()
    finally:
        batches.close()
        writer.close()
    return count


def _predict_regions(
    view: SourceView,
    regions: list[tuple[int, int, int, int]],
    store: MaskStore,
    sink: StripeSink,
    predictor: Predictor,
    settings: dict[str, Any],
    device: Any,
    advance: Any,
) -> int:
    """Resize mode: each tissue region resized to the model input, its prediction resized back."""
    import torch
    from PIL import Image

    window, mpp = settings["window"], settings["mpp"]
    runner = BatchRunner(predictor, 1)
    low_res: list[np.ndarray] = []
    for x, y, w, h in regions:
        factor = max(w, h) / window
        if view.kind == "slide" and factor > 1:
            read_mpp = mpp * factor
            rw, rh = min(window, max(1, round(w / factor))), min(window, max(1, round(h / factor)))
            pixels = view.reader.read(round(x / factor), round(y / factor), rw, rh, read_mpp)
        else:
            pixels = view.reader.read(x, y, w, h, mpp)
            if factor > 1:
                rw, rh = min(window, max(1, round(w / factor))), min(window, max(1, round(h / factor)))
                pixels = np.asarray(Image.fromarray(pixels).resize((rw, rh), Image.Resampling.BOX))
        canvas = np.full((window, window, 3), 255, np.uint8)
        canvas[: pixels.shape[0], : pixels.shape[1]] = pixels[:window, :window]
        batch = torch.from_numpy(canvas).to(device).permute(2, 0, 1)[None].float().div_(255.0)
        scores = runner(batch)[0, :, : pixels.shape[0], : pixels.shape[1]]
        low_res.append(scores.float().cpu().numpy())
        advance(1)
    stripe = store.chunk
    num_outputs = predictor.num_outputs
    for row0 in range(store.rows_done, view.height, stripe):
        row1 = min(row0 + stripe, view.height)
        total = np.zeros((num_outputs, row1 - row0, view.width), np.float32)
        weight = np.zeros((row1 - row0, view.width), np.float32)
        for (x, y, w, h), scores in zip(regions, low_res):
            top, bottom = max(row0, y), min(row1, y + h)
            if bottom <= top:
                continue
            total[:, top - row0 : bottom - row0, x : x + w] += resample_rows(scores, h, w, top - y, bottom - y)
            weight[top - row0 : bottom - row0, x : x + w] += 1
        covered = weight > 0
        probabilities = total / np.where(covered, weight, 1)[None]
        labels = np.argmax(probabilities, axis=0)
        labels[~covered] = settings["background"]
        sink(row0, labels, probabilities if store.probabilities is not None else None)
    return len(regions)


def check_loop_options(mode: str, blend: str, overlap: float, batch_size: int) -> None:
    """Refuse a mode, blend, overlap or batch size the slide loop cannot take."""
    if mode not in MODES:
        raise WsisegError(f"unknown mode {mode!r}: use {' or '.join(MODES)}")
    if blend not in BLEND_MODES:
        raise WsisegError(f"unknown blend {blend!r}: use {' or '.join(BLEND_MODES)}")
    if not 0 <= overlap < 1:
        raise WsisegError(f"--overlap must be a fraction of the window in [0, 1), got {overlap}")
    if batch_size < 1:
        raise WsisegError(f"--batch-size must be at least 1, got {batch_size}")


def run_slide(
    source: Any,
    predictor: Predictor,
    out_dir: Path | str,
    mpp: float,
    window: int,
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 16,
    device: str | None = "auto",
    workers: int | str = "auto",
    mode: str = "windowslide",
    background: int = 0,
    slide_mpp: float | None = None,
    overwrite: bool = False,
    save_probabilities: bool = False,
    exports: Sequence[str] = DEFAULT_EXPORTS,
    model_info: dict[str, Any] | None = None,
    show_progress: bool = True,
    chunk: int = 512,
    clip_to_tissue: bool = True,
    tissue: Any = "auto",
) -> dict[str, Any]:
    """Segment one slide or tile store with `predictor` into `out_dir`; returns the run summary.

    Outputs: mask.zarr (always), the `exports` (mask.tif, mask.ome.tif, overlay.png,
    mask.geojson) and summary.json; the log goes to segment.log. A partial run left in
    `out_dir` by an interrupted run with the same settings is resumed. `chunk` is the side of
    the mask store's chunks, which is also the granularity of resuming. With `clip_to_tissue`,
    pixels outside the tissue mask get the background label even inside a tissue window. `tissue` is
    the --tissue option: auto (detect; a tile store's own mask), all (the whole image) or a mask file.
    A source without tissue windows is an error, never an empty "ok".
    """
    started = time.perf_counter()
    bound_heap_growth()
    out_dir = Path(out_dir)
    check_loop_options(mode, blend, overlap, batch_size)
    multiple = int(getattr(predictor, "input_multiple", 1) or 1)
    if window % multiple:
        lower = max(multiple, window // multiple * multiple)
        raise WsisegError(
            f"window {window} is not a multiple of the model's patch size {multiple}: use {lower} or {lower + multiple}"
        )
    if not 0 <= background < predictor.num_outputs:
        raise WsisegError(f"background label {background} is not one of the {predictor.num_outputs} classes")
    paths = output_paths(out_dir, exports)
    torch_device = resolve_device(device)
    workers = parse_workers(workers, torch_device)
    view = open_source(source, mpp, slide_mpp, tissue)
    try:
        check_writable(paths["summary"], overwrite=True)  # the folder: existing outputs are judged below
        stride = max(1, window - round(overlap * window))
        settings = {
            "mode": mode, "mpp": float(mpp), "window": int(window), "stride": stride, "blend": blend,
            "background": int(background), "probabilities": bool(save_probabilities), "model": model_info or {},
            "clip_to_tissue": bool(clip_to_tissue), "tissue": str(tissue),
        }
        fingerprint = json.loads(json.dumps({**_fingerprint(view, settings, predictor), "exports": list(exports)}))
        finished = finished_run(out_dir, fingerprint, overwrite)
        if finished is not None:
            log.info("%s: finished by an earlier run with the same settings (%s): skipped", view.path.name, out_dir)
            return {**finished, "reused": True}

        with log_to_file(out_dir / LOG_NAME):
            log.info("segmenting %s (%s) at %g MPP: %dx%d px, %s mode", view.path, view.kind, mpp, view.width,
                     view.height, mode)
            timings: dict[str, float] = {}
            tick = time.perf_counter()
            mask = view.tissue()
            check_tissue(view, mask, mpp)
            timings["tissue_s"] = time.perf_counter() - tick
            # read before the loop, while no reader thread or stripe buffer is alive, so the read's
            # transient buffers (a few hundred MB on large slides) never stack on the loop's memory
            thumbnail = view.thumbnail() if "png" in exports else None
            store = MaskStore.resume_or_create(
                partial_path(paths["mask"]),
                _fingerprint(view, settings, predictor),
                width=view.width, height=view.height, mpp=mpp, class_names=predictor.class_names,
                colors=predictor.colors, source=str(view.path.resolve()), slide_mpp=view.slide_mpp, origin=view.origin,
                probabilities=save_probabilities, background=background, chunk=chunk,
            )
            resumed_from = store.rows_done
            sink = tissue_clipped(store.write_rows, mask, mpp, view.width, background) if clip_to_tissue else store.write_rows
            if resumed_from:
                log.info("resuming: rows 0..%d of %d were finished by an earlier run", resumed_from, view.height)

            tick = time.perf_counter()
            if mode == "windowslide":
                from wsiseg.slide.grid import Grid

                grid = Grid(view.width, view.height, window, stride)
                positions = grid.tissue_positions(mask, mpp)
                total = len(positions)
                log.info("%d of %d windows hold tissue (%d px, stride %d)", total, len(grid), window, stride)
                with progress_bar(total, f"segment {view.path.name}", "tiles", disable=not show_progress) as advance:
                    run_count = _predict_windows(
                        view, positions, store, sink, predictor, settings, torch_device, workers, batch_size, advance
                    )
                grid_total = len(grid)
            else:
                regions = tissue_regions(mask, mpp, view.width, view.height)
                total = grid_total = len(regions)
                log.info("%d tissue regions, each resized to %d px", total, window)
                with progress_bar(total, f"segment {view.path.name}", "regions", disable=not show_progress) as advance:
                    run_count = _predict_regions(view, regions, store, sink, predictor, settings, torch_device, advance)
            timings["predict_s"] = time.perf_counter() - tick

            tick = time.perf_counter()
            store.finish()
            timings["pyramid_s"] = time.perf_counter() - tick

            tick = time.perf_counter()
            from wsiseg.export.mask import write_export

            written = []
            for fmt in exports:
                partial = partial_path(paths[fmt])
                remove(partial)
                write_export(store, fmt, partial, thumbnail)
                written.append((partial, paths[fmt]))
            timings["exports_s"] = time.perf_counter() - tick
            timings["total_s"] = time.perf_counter() - started

            summary = {
                "source": str(view.path), "source_kind": view.kind, "model": model_info or {},
                "classes": list(predictor.class_names), "mode": mode, "mpp": mpp, "slide_mpp": view.slide_mpp,
                "width": view.width, "height": view.height, "window": window, "stride": stride,
                "overlap": overlap, "blend": blend, "batch_size": batch_size, "device": str(torch_device),
                "windows_total": grid_total, "windows_tissue": total, "windows_run": run_count,
                "resumed_from_row": resumed_from, "tissue_fraction": float(mask.fraction),
                "tiles_per_s": run_count / timings["predict_s"] if timings["predict_s"] > 0 else None,
                "timings": {k: round(v, 3) for k, v in timings.items()},
                "class_area_mm2": store.class_areas_mm2(),
                "outputs": {name: str(path) for name, path in paths.items()},
                "fingerprint": fingerprint,
            }
            moves = [*written, (store.path, paths["mask"])]
            publish_together(out_dir, moves, paths["summary"], json.dumps(summary, indent=2))
            rate = summary["tiles_per_s"]
            log.info("done in %.1f s (%s windows/s); outputs in %s", timings["total_s"],
                     f"{rate:.1f}" if rate is not None else "-", out_dir)
        return summary
    finally:
        if isinstance(source, (str, Path)):
            view.reader.close()
