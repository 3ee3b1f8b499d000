"""Tiling slides into tile stores, in threads or on dask workers: tissue tiles read at the target MPP, one chunk each."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from wsiseg.driver import SlideResult, dask_client, parse_workers_option, run_slides, slide_outputs
from wsiseg.errors import WsisegError
from wsiseg.locks import output_lock
from wsiseg.outputs import check_writable, partial_path, publish, remove
from wsiseg.progress import get_logger, log_to_file, progress_bar
from wsiseg.slide.grid import Grid
from wsiseg.slide.mask import tissue_request
from wsiseg.slide.reader import Slide, open_slide
from wsiseg.slide.tissue import TissueMask, TissueSettings, check_tissue_option, qc_picture, resolve_tissue, save_png
from wsiseg.store.tiles import (
    IMAGE, LOG_SUFFIX, QC_SUFFIX, TileStore, create_store, mark_complete, sidecar, write_pyramid, write_tiles,
)

log = get_logger("tile")

QC_SIDE = 1024
# Settings that must match for a partial store to be resumed (or a finished one reused), by the option
# that sets them.
RESUME_KEYS = {
    "source": "the slide", "mpp": "--mpp", "slide_mpp": "--slide-mpp", "width": "--mpp", "height": "--mpp",
    "tile": "--tile", "origin": "the slide", "tissue_request": "--tissue",
}


# --- executors --------------------------------------------------------------------------------
def tile_workers(workers: int | str | None) -> int:
    """Writer threads of a local run: a number, or auto/None for min(4, cores)."""
    return parse_workers_option(workers, lambda: max(1, min(4, os.cpu_count() or 1)), "in this thread")


@dataclass(frozen=True)
class TileSettings:
    """How slides are tiled, checked once when made.

    `tile`: tile (and chunk) size in pixels; `workers`: threads of this process (auto: min(4, cores);
    0 = in this thread); `scheduler`: address of an existing dask cluster instead; `overwrite`:
    replace existing stores; `tissue`: auto (detect, with `tissue_options` as TissueSettings
    fields), all, or a mask file; `progress`: show progress bars; `skip_errors`: go on past slides
    that fail (several slides).
    """

    tile: int = 512
    workers: int | str | None = None
    scheduler: str | None = None
    overwrite: bool = False
    tissue: str | Path = "auto"
    tissue_options: dict[str, Any] | None = None
    progress: bool = True
    skip_errors: bool = False

    def __post_init__(self) -> None:
        if self.tile < 16:
            raise WsisegError(f"--tile must be at least 16 pixels, got {self.tile}")
        tile_workers(self.workers)
        object.__setattr__(self, "tissue", check_tissue_option(self.tissue))

    @classmethod
    def of(cls, settings: TileSettings | None = None, **options: Any) -> TileSettings:
        """`settings` (default: the defaults) with `options` (its field names) replaced; `tissue_mask_path`,
        the older name of a `tissue` mask file, wins over `tissue` when given."""
        mask_path = options.pop("tissue_mask_path", None)
        if mask_path is not None:
            options["tissue"] = mask_path
        unknown = set(options) - {field.name for field in fields(cls)}
        if unknown:
            raise TypeError(f"unknown tiling options: {', '.join(sorted(unknown))}")
        return replace(settings or cls(), **options)

    @property
    def threads(self) -> int:
        """Writer threads of a local run."""
        return tile_workers(self.workers)


def _batches(positions: list[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    size = max(1, min(32, math.ceil(len(positions) / max(1, parts))))
    return [positions[i : i + size] for i in range(0, len(positions), size)]


def _run_tiles(
    client: Any, workers: int, slide: Slide, store: TileStore, positions: list[tuple[int, int]], label: str,
    show: bool,
) -> None:
    """Write the tiles: as tasks of the dask cluster of `client`, else in `workers` threads of this process.

    Threads need no networking and read and compress as fast as processes (OpenSlide, the JPEG
    decoders and the zarr codecs release the GIL).
    """
    array_path = str(store.path / IMAGE)
    shape = (3, store.height, store.width)
    with progress_bar(len(positions), label, unit="tiles", disable=not show) as advance:
        if client is None and workers == 0:
            for batch in _batches(positions, max(1, len(positions) // 8)):
                advance(write_tiles(slide, array_path, shape, store.mpp, store.tile, batch))
            return
        if client is None:
            batches = _batches(positions, 4 * workers)
            with ThreadPoolExecutor(workers, thread_name_prefix="wsiseg-tile") as pool:
                futures = [pool.submit(write_tiles, slide, array_path, shape, store.mpp, store.tile, b) for b in batches]
                try:
                    for future in as_completed(futures):
                        advance(future.result())
                finally:
                    for future in futures:
                        future.cancel()
            return
        from distributed import as_completed as dask_completed

        count = max(1, len(client.scheduler_info().get("workers", {})))
        batches = _batches(positions, 4 * count)
        futures = [
            client.submit(write_tiles, slide, array_path, shape, store.mpp, store.tile, batch, pure=False)
            for batch in batches
        ]
        try:
            for future in dask_completed(futures):
                advance(future.result())
        finally:
            client.cancel(futures)


# --- one slide --------------------------------------------------------------------------------
def _settings(slide: Slide, mpp: float, options: TileSettings) -> dict[str, Any]:
    frame = slide.frame(mpp)
    bounds = slide.bounds
    return {
        "source": str(slide.path.resolve()),
        "slide_format": slide.format,
        "mpp": float(mpp),
        "slide_mpp": frame.slide_mpp,
        "slide_mpp_source": "override" if slide.slide_mpp is not None else "metadata",
        "width": frame.width,
        "height": frame.height,
        "tile": options.tile,
        "tissue_request": json.loads(json.dumps(  # as the store's JSON gives it back
            {"tissue": tissue_request(options.tissue), "options": options.tissue_options or {}})),
        "origin": list(frame.origin),
        "slide_size": [bounds.width, bounds.height],
        "slide_dimensions": list(slide.level_dimensions[0]),
    }


def _resumable(partial: Path, settings: dict[str, Any]) -> TileStore | None:
    """The partial store left by an interrupted run with the same settings, or None when there is none."""
    if not partial.exists():
        return None
    try:
        store = TileStore.open(partial)
    except WsisegError:
        store = None
    if store is None:
        raise WsisegError(f"{partial}, left by an interrupted run, is not a readable tile store: pass --overwrite "
                          "to start again")
    differing = _differing(store, settings)
    if differing:
        raise WsisegError(
            f"{partial} holds an interrupted run with other settings ({', '.join(differing)}): pass --overwrite "
            "to start again, or rerun with its settings to resume it"
        )
    return store


def _differing(store: TileStore, settings: dict[str, Any]) -> list[str]:
    """The options by which `settings` differ from those `store` was tiled with."""
    stored = {**store.attrs, "tissue_request": store.attrs.get("tissue_request", _legacy_request(store.attrs))}
    return list(dict.fromkeys(flag for key, flag in RESUME_KEYS.items() if stored.get(key) != settings[key]))


def _legacy_request(attrs: dict[str, Any]) -> dict[str, Any]:
    """The tissue request of a store tiled before stores recorded it, as far as its tissue source tells."""
    source = attrs.get("tissue", {}).get("source")
    return {"tissue": {"detected": "auto"}.get(source, source), "options": {}}


def _new_store(partial: Path, slide: Slide, settings: dict[str, Any], tissue: TissueMask, mask_source: str) -> TileStore:
    grid = Grid(settings["width"], settings["height"], settings["tile"], settings["tile"], clamp=False)
    positions = grid.tissue_positions(tissue, settings["mpp"])
    rows, cols = grid.shape
    settings = {
        **settings,
        "grid": {"tile": settings["tile"], "rows": rows, "columns": cols, "tissue_tiles": len(positions)},
        "tissue": {"path": "tissue", "mpp": tissue.mpp, "source": mask_source, "fraction": tissue.fraction},
    }
    store = create_store(partial, settings, tissue)
    thumbnail = slide.thumbnail(QC_SIDE)
    picture = qc_picture(thumbnail, tissue, positions, settings["tile"], settings["width"])
    save_png(sidecar(partial, QC_SUFFIX), picture)
    return store


def _finished(out: Path, settings: dict[str, Any], overwrite: bool) -> TileStore | None:
    """The store a finished run with these settings left at `out` (nothing to do), else None (to tile).

    A store with other settings is refused without `overwrite`.
    """
    if overwrite or not out.exists():
        return None
    try:
        store = TileStore.open(out)
    except WsisegError:
        store = None
    if store is None:
        raise WsisegError(f"{out} already exists and is not a tile store: pass --overwrite to replace it, "
                          "or choose another output path")
    differing = _differing(store, settings)
    if store.is_complete and not differing:
        return store
    why = f"holds other settings ({', '.join(differing)})" if differing else "holds an unfinished store"
    raise WsisegError(f"{out} already exists and {why}: pass --overwrite to replace it, or choose another output path")


def tile_slide(
    slide: str | Path | Slide,
    out: str | Path,
    mpp: float,
    settings: TileSettings | None = None,
    *,
    slide_mpp: float | None = None,
    client: Any = None,
    **options: Any,
) -> TileStore:
    """Tile one slide's tissue at `mpp` into the zarr store `out` (resuming an interrupted run).

    `settings` (or `options`, its fields by name, see TileSettings) say how; `client`: an open dask
    client to reuse. A store a finished run with the same settings left at `out` is returned as it is.
    """
    settings = TileSettings.of(settings, **options)
    if not isinstance(slide, Slide):
        with open_slide(slide, slide_mpp) as opened:
            return _tile(opened, Path(out), mpp, settings, client)[0]
    return _tile(slide, Path(out), mpp, settings, client)[0]


def _tile(slide: Slide, out: Path, mpp: float, options: TileSettings, client: Any) -> tuple[TileStore, int | None]:
    """`tile_slide` of an open slide: (the store, tiles written, or None when a finished run is reused)."""
    threads, tile = options.threads, options.tile
    settings = _settings(slide, mpp, options)
    if mpp < slide.mpp * (1 - 1e-6):
        log.warning(
            "%s: target %g MPP is finer than the slide's %g: upsampling %.2fx (no detail is added)",
            slide.path.name, mpp, slide.mpp, slide.mpp / mpp,
        )
    finished = _finished(out, settings, options.overwrite)
    if finished is not None:
        log.info("%s: %s was finished by an earlier run with the same settings: skipped", slide.path.name, out)
        _publish_sidecars(out)
        return finished, None
    check_writable(out, overwrite=True)
    partial = partial_path(out)
    if options.overwrite and partial.exists():
        remove(partial)
    store = _resumable(partial, settings)
    with log_to_file(_log_path(out)):
        if store is None:
            log.info("%s: detecting tissue", slide.path.name)
            mask, source = resolve_tissue(options.tissue, slide, TissueSettings(**(options.tissue_options or {})))
            store = _new_store(partial, slide, settings, mask, source)
        else:
            log.info("%s: resuming the interrupted run in %s", slide.path.name, partial)
            store.remove_temporaries()
        positions = store.tissue_tiles()
        missing = sorted(set(positions) - set(store.stored_tiles(positions)), key=lambda p: (p[1], p[0]))
        log.info(
            "%s: %dx%d px at %g MPP, %d tissue tiles of %d px, %d to write",
            slide.path.name, store.width, store.height, mpp, len(positions), tile, len(missing),
        )
        if not positions:
            log.warning("%s: no tissue found: the store is empty (check the QC picture; pass --tissue all or a mask "
                        "file)", slide.path.name)
        started = time.perf_counter()
        if missing:
            with nullcontext(client) if client is not None else dask_client(options.scheduler) as active:
                _run_tiles(active, threads, slide, store, missing, f"tiling {slide.path.name}", options.progress)
        left = len(positions) - len(store.stored_tiles(positions))
        if left:
            raise WsisegError(f"{left} tiles of {slide.path.name} were not written; rerun the same command to resume")
        elapsed = time.perf_counter() - started
        log.info("%s: wrote %d tiles in %.1f s (%.1f tiles/s)", slide.path.name, len(missing), elapsed,
                 len(missing) / elapsed if elapsed > 0 else 0.0)
        log.info("%s: pyramid of %d levels written", slide.path.name, write_pyramid(partial))
    mark_complete(partial)
    publish(partial, out)
    _publish_sidecars(out)
    return TileStore.open(out), len(missing)


def _log_path(out: Path) -> Path:
    """Where a run writes its log until the store is published."""
    return partial_path(out).with_name(f".{out.name}.log")


def _publish_sidecars(out: Path) -> None:
    """Move the QC picture and log of a published store beside it (also those a run killed just after
    publishing the store left behind)."""
    for temporary, final in ((sidecar(partial_path(out), QC_SUFFIX), sidecar(out, QC_SUFFIX)),
                             (_log_path(out), sidecar(out, LOG_SUFFIX))):
        if temporary.exists():
            publish(temporary, final)


# --- several slides ---------------------------------------------------------------------------
def _tile_one(slide: Slide, out: Path, mpp: float, options: TileSettings, client: Any) -> SlideResult:
    started = time.perf_counter()
    try:
        store, written = _tile(slide, out, mpp, options, client)
    finally:
        slide.close()
    tiles = len(store.tissue_tiles())
    elapsed = time.perf_counter() - started
    status = "skipped" if written is None else "done" if tiles else "empty"
    rate = written / elapsed if written and elapsed > 0 else None
    return SlideResult(Path(slide.path), out, status, (store.width, store.height), tiles, rate)


def tile_slides(
    slides: Sequence[str | Path],
    out: str | Path,
    mpp: float,
    settings: TileSettings | None = None,
    *,
    slide_mpp: float | None = None,
    **options: Any,
) -> list[SlideResult]:
    """Tile several slides, a store each (`slide_outputs`, suffix .zarr), sharing one dask client.

    `settings` (or `options`, its fields by name, see TileSettings) say how. Every slide is opened
    before any tiling starts; with `skip_errors`, go on past bad ones. Stores finished by an earlier
    run with the same settings are skipped, interrupted ones resume. The output folder (or store)
    is locked for the run.
    """
    settings = TileSettings.of(settings, **options)
    paths = [Path(s) for s in slides]
    if not paths:
        raise WsisegError("no slides given: pass one or more slide files")
    if isinstance(settings.tissue, Path) and len(paths) > 1:
        raise WsisegError("a tissue mask file applies to one slide: tile the slides one at a time")
    stores = slide_outputs(paths, out, ".zarr")
    skip_errors = settings.skip_errors
    with output_lock(Path(out), "tile"):
        opened: dict[Path, Slide] = {}
        failed: dict[Path, SlideResult] = {}
        for path, store in zip(paths, stores):
            try:
                opened[path] = open_slide(path, slide_mpp)
                opened[path].size_at(mpp)
            except WsisegError as error:
                failed[path] = _preflight_failure(path, store, error, skip_errors, opened)
        ready = [(path, store) for path, store in zip(paths, stores) if path in opened]
        local = replace(settings, scheduler=None)  # the slides share the client opened here
        with dask_client(settings.scheduler) if ready else nullcontext() as client:
            work = lambda path, store: _tile_one(opened[path], store, mpp, local, client)  # noqa: E731
            done = run_slides([p for p, _ in ready], [s for _, s in ready], work, skip_errors=skip_errors)
        results = dict(zip([p for p, _ in ready], done)) | failed
    return [results[path] for path in paths]


def _preflight_failure(
    path: Path, store: Path, error: WsisegError, skip_errors: bool, opened: dict[Path, Slide]
) -> SlideResult:
    if not skip_errors:
        for slide in opened.values():
            slide.close()
        raise error
    log.error("%s", error)
    return SlideResult(path, store, "failed", message=str(error))
