"""The slide loop shared by `segment` and `fseg`: windows in, a finished mask store and its exports out.

`run_slide` reads the tissue windows of a slide (or tile store), runs any predictor on them,
blends the scores in row stripes, writes label rows to the mask store as soon as they are
final, and at the end builds the pyramid, writes the exports and a summary. Everything is
built under partial names; finished chunk rows are recorded so an interrupted run resumes
where it stopped and produces identical output.
"""

from __future__ import annotations

import ctypes
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.engine.blend import StripeSink
from wsiseg.engine.loader import parse_workers
from wsiseg.engine.predictors import Predictor
from wsiseg.engine.regions import predict_regions, tissue_regions
from wsiseg.engine.settings import RunSettings, background_label, check_exports
from wsiseg.engine.source import SourceView, open_source
from wsiseg.engine.windows import predict_windows
from wsiseg.devices import resolve_device
from wsiseg.errors import WsisegError
from wsiseg.export.choices import EXPORTS
from wsiseg.outputs import check_writable, finish_publish, partial_path, publish_together, remove
from wsiseg.progress import get_logger, log_to_file, progress_bar
from wsiseg.slide.grid import Frame, Grid
from wsiseg.slide.mask import TISSUE_MODES, tissue_request
from wsiseg.store.masks import MaskStore

log = get_logger("engine")

MASK_NAME = "mask.zarr"
SUMMARY_NAME = "summary.json"
LOG_NAME = "segment.log"
FORMAT_VERSION = 1
# resize mode's algorithm: 2 is engine/image's resize (aspect kept); a partial run of 1 is not resumed
RESIZE_VERSION = 2


def output_paths(out_dir: Path, exports: Sequence[str]) -> dict[str, Path]:
    """Final paths of every output of a run."""
    check_exports(exports)
    paths = {"mask": out_dir / MASK_NAME, "summary": out_dir / SUMMARY_NAME}
    for fmt in exports:
        paths[fmt] = out_dir / EXPORTS.detail(fmt)
    return paths


# free heap memory kept after a stripe, beyond which it is given back to the system
FREE_HEAP_BUDGET_BYTES = 512 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_released(sink: StripeSink) -> StripeSink:
    """A stripe sink that gives the heap's free memory back to the system once it exceeds a budget.

    glibc raises its mmap threshold after each large free, so the tens-of-MB temporaries of a
    long run end up kept in the heap (measured +600-1,100 MB of resident memory on 60,000-pixel
    slides). Trimming (glibc's malloc_trim) when more than FREE_HEAP_BUDGET_BYTES lie free keeps it
    bounded; forcing every allocation over 1 MB to mmap did too, but made each model activation
    fault its pages in again (15-25% of a CPU segment run). No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim, info = libc.malloc_trim, libc.mallinfo2
    except (OSError, AttributeError):
        return sink
    info.restype = _MallInfo2

    def write(y0: int, labels: np.ndarray, probabilities: np.ndarray | None) -> None:
        sink(y0, labels, probabilities)
        if info().fordblks > FREE_HEAP_BUDGET_BYTES:
            trim(0)

    return write


def check_tissue(view: SourceView, mask: Any, mpp: float, tissue: str | Path = "auto") -> None:
    """A run without a single tissue window is a user error (never an empty "ok"), checked before any output."""
    where = f"{view.path.name} ({view.width}x{view.height} px)"
    if not mask.mask.any():
        if str(tissue) not in TISSUE_MODES:
            raise WsisegError(f"the --tissue mask {Path(tissue).name} marks no tissue in {where}: check that it "
                              "covers this image (GeoJSON in level-0 pixels, a PNG over the whole image), or pass "
                              "--tissue all")
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


def fingerprint_settings(settings: RunSettings, stride: int, model_info: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a run's output (what a resumed or reused run must share)."""
    return {
        "mode": settings.mode, "mpp": float(settings.mpp), "window": int(settings.window), "stride": stride,
        "blend": settings.blend, "background": int(settings.background),
        "probabilities": bool(settings.save_probabilities), "model": model_info,
        "clip_to_tissue": bool(settings.clip_to_tissue), "tissue": tissue_request(settings.tissue),
        **({"resize_version": RESIZE_VERSION} if settings.mode == "resize" else {}),
    }


def _fingerprint(view: SourceView, settings: dict[str, Any], predictor: Predictor) -> dict[str, Any]:
    stat = view.path.stat() if view.path.is_file() else None
    return {
        "format_version": FORMAT_VERSION,
        "source": str(view.path.resolve()),
        "source_size": stat.st_size if stat else None,
        "source_mtime": stat.st_mtime if stat else None,
        "classes": list(predictor.class_names),
        **settings,
        # a tile store's large resize regions are read from its pyramid: a run of the full-size reads is not resumed
        **({"store_read": "pyramid"} if view.kind == "tiles" and "resize_version" in settings else {}),
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


def for_predictor(settings: RunSettings, predictor: Predictor) -> RunSettings:
    """`settings` checked against the model: MPP and window given, the window a multiple of its patch
    size, and the background resolved to one of its labels."""
    if settings.mpp is None or settings.window is None:
        raise WsisegError("a slide run needs an MPP and a window: pass mpp= and window= "
                          "(segment_slide and fseg_slide take them from the model)")
    multiple = int(getattr(predictor, "input_multiple", 1) or 1)
    if settings.window % multiple:
        lower = max(multiple, settings.window // multiple * multiple)
        raise WsisegError(
            f"window {settings.window} is not a multiple of the model's patch size {multiple}: "
            f"use {lower} or {lower + multiple}"
        )
    return settings.replace(background=background_label(predictor.class_names, settings.background))


@dataclass
class SlideRun:
    """One slide's run once its source is open: what it reads, with what, and where it writes."""

    view: SourceView
    predictor: Predictor
    settings: RunSettings  # `for_predictor`'s: MPP, window and background label known
    grid: Grid
    paths: dict[str, Path]
    device: Any
    model_info: dict[str, Any]
    started: float
    timings: dict[str, float] = field(default_factory=dict)

    @cached_property
    def loop_settings(self) -> dict[str, Any]:
        return fingerprint_settings(self.settings, self.grid.stride, self.model_info)

    @cached_property
    def fingerprint(self) -> dict[str, Any]:
        """The run's fingerprint as summary.json records it (JSON types)."""
        fingerprint = _fingerprint(self.view, self.loop_settings, self.predictor)
        return json.loads(json.dumps({**fingerprint, "exports": list(self.settings.exports)}))

    def timed(self, name: str, tick: float) -> None:
        self.timings[name] = time.perf_counter() - tick


def run_slide(
    source: Any,
    predictor: Predictor,
    out_dir: Path | str,
    settings: RunSettings | None = None,
    model_info: dict[str, Any] | None = None,
    torch_device: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Segment one slide or tile store with `predictor` into `out_dir`; returns the run summary.

    `settings` (a `RunSettings`; `options` override its fields by name, e.g. `mpp=2.0, window=256`)
    must give the MPP and window. `torch_device`: the device `settings.device` names, when the
    caller has resolved it already (to load its model there). Outputs: mask.zarr (always), the
    exports (mask.tif, mask.ome.tif, overlay.png, mask.geojson) and summary.json; the log goes to
    segment.log. A partial run left in `out_dir` by an
    interrupted run with the same settings is resumed. A source without tissue windows is an
    error, never an empty "ok".
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    settings = for_predictor(RunSettings.build(settings, **options), predictor)
    paths = output_paths(out_dir, settings.exports)
    device = resolve_device(settings.device) if torch_device is None else torch_device
    view = open_source(source, settings.mpp, settings.slide_mpp, settings.tissue)
    try:
        check_writable(paths["summary"], overwrite=True)  # the folder: existing outputs are judged below
        grid = Grid.from_overlap(view.width, view.height, settings.window, settings.overlap)
        run = SlideRun(view, predictor, settings, grid, paths, device, model_info or {}, started)
        finished = finished_run(out_dir, run.fingerprint, settings.overwrite)
        if finished is not None:
            log.info("%s: finished by an earlier run with the same settings (%s): skipped", view.path.name, out_dir)
            return {**finished, "reused": True}
        with log_to_file(out_dir / LOG_NAME):
            return _produce(run, out_dir)
    finally:
        if isinstance(source, (str, Path)):
            view.reader.close()


def _produce(run: SlideRun, out_dir: Path) -> dict[str, Any]:
    """Tissue, prediction, pyramid, exports and summary of a run that is not finished yet."""
    view, settings = run.view, run.settings
    log.info("segmenting %s (%s) at %g MPP: %dx%d px, %s mode", view.path, view.kind, settings.mpp, view.width,
             view.height, settings.mode)
    tick = time.perf_counter()
    mask = view.tissue()
    check_tissue(view, mask, settings.mpp, settings.tissue)
    run.timed("tissue_s", tick)
    # read before the loop, while no reader thread or stripe buffer is alive, so the read's
    # transient buffers (a few hundred MB on large slides) never stack on the loop's memory
    thumbnail = view.thumbnail() if "png" in settings.exports else None
    store = MaskStore.resume_or_create(
        partial_path(run.paths["mask"]),
        _fingerprint(view, run.loop_settings, run.predictor),
        Frame(view.width, view.height, settings.mpp, view.slide_mpp, view.origin),
        class_names=run.predictor.class_names, colors=run.predictor.colors, source=str(view.path.resolve()),
        probabilities=settings.save_probabilities, background=settings.background, chunk=settings.chunk,
    )
    resumed_from = store.rows_done
    if resumed_from:
        log.info("resuming: rows 0..%d of %d were finished by an earlier run", resumed_from, view.height)
    tick = time.perf_counter()
    counts = _predict(run, mask, store)
    run.timed("predict_s", tick)
    tick = time.perf_counter()
    store.finish()
    run.timed("pyramid_s", tick)
    written = _write_exports(run, store, thumbnail)
    run.timed("total_s", run.started)
    summary = _summary(run, counts, resumed_from, mask, store)
    moves = [*written, (store.path, run.paths["mask"])]
    publish_together(out_dir, moves, run.paths["summary"], json.dumps(summary, indent=2))
    rate = summary["tiles_per_s"]
    log.info("done in %.1f s (%s windows/s); outputs in %s", run.timings["total_s"],
             f"{rate:.1f}" if rate is not None else "-", out_dir)
    return summary


def _predict(run: SlideRun, mask: Any, store: MaskStore) -> tuple[int, int, int]:
    """Every tissue window (or region) through the predictor into `store`: (windows in all, with tissue, run)."""
    view, settings = run.view, run.settings
    sink = store.write_rows
    if settings.clip_to_tissue:
        sink = tissue_clipped(store.write_rows, mask, settings.mpp, view.width, settings.background)
    sink = heap_released(sink)
    label = f"segment {view.path.name}"
    if settings.mode == "windowslide":
        positions = run.grid.tissue_positions(mask, settings.mpp)
        log.info("%d of %d windows hold tissue (%d px, stride %d)", len(positions), len(run.grid), settings.window,
                 run.grid.stride)
        workers = parse_workers(settings.workers, run.device)
        with progress_bar(len(positions), label, "tiles", disable=not settings.show_progress) as advance:
            count = predict_windows(view, positions, store, sink, run.predictor, settings, run.device, workers,
                                    settings.batch_size, advance)
        return len(run.grid), len(positions), count
    regions = tissue_regions(mask, settings.mpp, view.width, view.height)
    log.info("%d tissue regions, each resized to %d px", len(regions), settings.window)
    with progress_bar(len(regions), label, "regions", disable=not settings.show_progress) as advance:
        count = predict_regions(view, regions, store, sink, run.predictor, settings, run.device, advance)
    return len(regions), len(regions), count


def _write_exports(run: SlideRun, store: MaskStore, thumbnail: Any) -> list[tuple[Path, Path]]:
    """Every export under its partial name: (partial, final) pairs for the publish."""
    from wsiseg.export.mask import write_export

    tick = time.perf_counter()
    written = []
    for fmt in run.settings.exports:
        partial = partial_path(run.paths[fmt])
        remove(partial)
        write_export(store, fmt, partial, thumbnail)
        written.append((partial, run.paths[fmt]))
    run.timed("exports_s", tick)
    return written


def _summary(
    run: SlideRun, counts: tuple[int, int, int], resumed_from: int, mask: Any, store: MaskStore
) -> dict[str, Any]:
    """summary.json: what was run, on what, how fast, and the outputs (its fingerprint marks it finished)."""
    view, settings, timings = run.view, run.settings, run.timings
    grid_total, total, run_count = counts
    return {
        "source": str(view.path), "source_kind": view.kind, "model": run.model_info,
        "classes": list(run.predictor.class_names), "mode": settings.mode, "mpp": settings.mpp,
        "slide_mpp": view.slide_mpp, "width": view.width, "height": view.height, "window": settings.window,
        "stride": run.grid.stride, "overlap": settings.overlap, "blend": settings.blend,
        "batch_size": settings.batch_size, "device": str(run.device),
        "windows_total": grid_total, "windows_tissue": total, "windows_run": run_count,
        "resumed_from_row": resumed_from, "tissue_fraction": float(mask.fraction),
        "tiles_per_s": run_count / timings["predict_s"] if timings["predict_s"] > 0 else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "class_area_mm2": store.class_areas_mm2(),
        "outputs": {name: str(path) for name, path in run.paths.items()},
        "fingerprint": run.fingerprint,
    }
