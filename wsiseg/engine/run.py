"""The slide loop shared by `segment` and `fseg`: windows in, a finished mask store and its exports out.

`run_slide` reads the tissue windows of a slide (or tile store), runs any predictor on them,
blends the scores in row stripes, writes label rows to the mask store as soon as they are
final, and at the end builds the pyramid, writes the exports and a summary. Everything is
built under partial names; finished chunk rows are recorded so an interrupted run resumes
where it stopped and produces identical output.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.engine.blend import BLEND_MODES, StripeSink
from wsiseg.engine.image import MODES
from wsiseg.engine.loader import parse_workers
from wsiseg.engine.predictors import Predictor
from wsiseg.engine.regions import predict_regions, tissue_regions
from wsiseg.engine.source import SourceView, open_source
from wsiseg.engine.windows import predict_windows
from wsiseg.devices import resolve_device
from wsiseg.errors import WsisegError
from wsiseg.export.choices import DEFAULT_EXPORTS, EXPORTS
from wsiseg.outputs import check_writable, finish_publish, partial_path, publish_together, remove
from wsiseg.progress import get_logger, log_to_file, progress_bar
from wsiseg.slide.grid import Frame
from wsiseg.store.masks import MaskStore

log = get_logger("engine")

MASK_NAME = "mask.zarr"
SUMMARY_NAME = "summary.json"
LOG_NAME = "segment.log"
FORMAT_VERSION = 1


def output_paths(out_dir: Path, exports: Sequence[str]) -> dict[str, Path]:
    """Final paths of every output of a run."""
    paths = {"mask": out_dir / MASK_NAME, "summary": out_dir / SUMMARY_NAME}
    for fmt in exports:
        if fmt not in EXPORTS:
            raise WsisegError(f"unknown export format {fmt!r}: use any of {', '.join(EXPORTS)}")
        paths[fmt] = out_dir / EXPORTS.detail(fmt)
    return paths


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
                Frame(view.width, view.height, mpp, view.slide_mpp, view.origin), class_names=predictor.class_names,
                colors=predictor.colors, source=str(view.path.resolve()),
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
                    run_count = predict_windows(
                        view, positions, store, sink, predictor, settings, torch_device, workers, batch_size, advance
                    )
                grid_total = len(grid)
            else:
                regions = tissue_regions(mask, mpp, view.width, view.height)
                total = grid_total = len(regions)
                log.info("%d tissue regions, each resized to %d px", total, window)
                with progress_bar(total, f"segment {view.path.name}", "regions", disable=not show_progress) as advance:
                    run_count = predict_regions(view, regions, store, sink, predictor, settings, torch_device, advance)
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
