"""Tiling slides into tile stores with dask workers: tissue tiles read at the target MPP, one chunk each."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from wsiseg.errors import WsisegError
from wsiseg.outputs import check_writable, partial_path, publish, remove
from wsiseg.progress import get_logger, log_to_file, progress_bar
from wsiseg.slide.grid import Grid
from wsiseg.slide.reader import Slide, open_slide
from wsiseg.slide.tissue import TissueMask, TissueSettings, check_tissue_option, qc_picture, resolve_tissue, save_png
from wsiseg.store.tiles import (
    IMAGE, LOG_SUFFIX, QC_SUFFIX, TileStore, create_store, mark_complete, sidecar, write_pyramid, write_tiles,
)

log = get_logger("tile")

QC_SIDE = 1024
# Settings that must match for a partial store to be resumed.
RESUME_KEYS = ("source", "mpp", "slide_mpp", "width", "height", "tile", "origin")


@dataclass
class TileResult:
    """What happened to one slide of a tiling run."""

    slide: Path
    store: Path | None
    status: str  # "done", "empty" (no tissue) or "failed"
    tiles: int = 0
    seconds: float = 0.0
    message: str = ""
    size: tuple[int, int] = (0, 0)


# --- executors --------------------------------------------------------------------------------
def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A dask.distributed client: of an existing cluster at `scheduler`, or of a local process cluster.

    `workers=0` runs in this process without dask (yields None).
    """
    if scheduler is None and workers == 0:
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as error:
            raise WsisegError(
                f"cannot reach the dask scheduler at {scheduler} ({error}); check the address or drop --scheduler"
            ) from None
        with client:
            yield client
        return
    count = workers or default_workers()
    # The workers' statistical profiler samples every task thread 100 times a second: pure overhead here.
    with dask.config.set({"distributed.worker.profile.enabled": False}), LocalCluster(
        n_workers=count,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # any free port: never clash with another cluster's 8787
        scheduler_kwargs={"dashboard": False},
        worker_dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster, Client(cluster) as client:
        yield client


def _batches(positions: list[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    size = max(1, min(32, math.ceil(len(positions) / max(1, parts))))
    return [positions[i : i + size] for i in range(0, len(positions), size)]


def _run_tiles(
    client: Any, slide: Slide, store: TileStore, positions: list[tuple[int, int]], label: str, show: bool
) -> None:
    array_path = str(store.path / IMAGE)
    shape = (3, store.height, store.width)
    with progress_bar(len(positions), label, unit="tiles", disable=not show) as advance:
        if client is None:
            for batch in _batches(positions, max(1, len(positions) // 8)):
                advance(write_tiles(slide, array_path, shape, store.mpp, store.tile, batch))
            return
        from distributed import as_completed

        workers = max(1, len(client.scheduler_info().get("workers", {})))
        batches = _batches(positions, 4 * workers)
        futures = [
            client.submit(write_tiles, slide, array_path, shape, store.mpp, store.tile, batch, pure=False)
            for batch in batches
        ]
        for future in as_completed(futures):
            advance(future.result())


# --- one slide --------------------------------------------------------------------------------
def _settings(slide: Slide, mpp: float, tile: int) -> dict[str, Any]:
    width, height = slide.size_at(mpp)
    bounds = slide.bounds
    return {
        "source": str(slide.path.resolve()),
        "slide_format": slide.format,
        "mpp": float(mpp),
        "slide_mpp": slide.mpp,
        "slide_mpp_source": "override" if slide.slide_mpp is not None else "metadata",
        "width": width,
        "height": height,
        "tile": tile,
        "origin": [bounds.x, bounds.y],
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
    if store is None or any(store.attrs.get(k) != settings[k] for k in RESUME_KEYS):
        raise WsisegError(
            f"{partial} holds an interrupted run with other settings: pass --overwrite to start again, "
            "or rerun with the same --mpp, --tile and --slide-mpp to resume it"
        )
    return store


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


def _check_workers(workers: int | None) -> None:
    """A negative worker count would start a cluster without workers that waits for ever."""
    if workers is not None and workers < 0:
        raise WsisegError(f"--workers must be 0 or more (0 = in this process), got {workers}")


def tile_slide(
    slide: str | Path | Slide,
    out: str | Path,
    mpp: float,
    *,
    slide_mpp: float | None = None,
    tile: int = 512,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    tissue_mask_path: str | Path | None = None,
    tissue_options: dict[str, Any] | None = None,
    client: Any = None,
    progress: bool = True,
    tissue: str | Path = "auto",
) -> TileStore:
    """Tile one slide's tissue at `mpp` into the zarr store `out` (resuming an interrupted run).

    `workers`: local dask worker processes (default min(4, CPUs); 0 = in this process);
    `scheduler`: address of an existing dask cluster instead; `client`: an open dask client to reuse.
    `tissue`: auto (detect, with `tissue_options` as TissueSettings fields), all, or a mask file
    (`tissue_mask_path` is the same as passing the file as `tissue`).
    """
    if tile < 16:
        raise WsisegError(f"--tile must be at least 16 pixels, got {tile}")
    _check_workers(workers)
    if not isinstance(slide, Slide):
        with open_slide(slide, slide_mpp) as opened:
            return tile_slide(
                opened, out, mpp, tile=tile, workers=workers, scheduler=scheduler, overwrite=overwrite,
                tissue_mask_path=tissue_mask_path, tissue_options=tissue_options, client=client, progress=progress,
                tissue=tissue,
            )
    out = Path(out)
    tissue = check_tissue_option(tissue_mask_path if tissue_mask_path is not None else tissue)
    settings = _settings(slide, mpp, tile)
    if mpp < slide.mpp * (1 - 1e-6):
        log.warning(
            "%s: target %g MPP is finer than the slide's %g: upsampling %.2fx (no detail is added)",
            slide.path.name, mpp, slide.mpp, slide.mpp / mpp,
        )
    check_writable(out, overwrite)
    partial = partial_path(out)
    if overwrite and partial.exists():
        remove(partial)
    store = _resumable(partial, settings)
    with log_to_file(partial.with_name(f".{out.name}.log")) as log_file:
        if store is None:
            log.info("%s: detecting tissue", slide.path.name)
            mask, source = resolve_tissue(tissue, slide, TissueSettings(**(tissue_options or {})))
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
            context = nullcontext(client) if client is not None else dask_client(workers, scheduler)
            with context as active:
                _run_tiles(active, slide, store, missing, f"tiling {slide.path.name}", progress)
        left = len(positions) - len(store.stored_tiles(positions))
        if left:
            raise WsisegError(f"{left} tiles of {slide.path.name} were not written; rerun the same command to resume")
        elapsed = time.perf_counter() - started
        log.info("%s: wrote %d tiles in %.1f s (%.1f tiles/s)", slide.path.name, len(missing), elapsed,
                 len(missing) / elapsed if elapsed > 0 else 0.0)
        log.info("%s: pyramid of %d levels written", slide.path.name, write_pyramid(partial))
    mark_complete(partial)
    publish(partial, out)
    if sidecar(partial, QC_SUFFIX).exists():
        sidecar(partial, QC_SUFFIX).replace(sidecar(out, QC_SUFFIX))
    Path(log_file).replace(sidecar(out, LOG_SUFFIX))
    return TileStore.open(out)


# --- several slides ---------------------------------------------------------------------------
def slide_stem(path: Path) -> str:
    """The name a slide's store gets: file name without its (double) suffix, e.g. a.ome.tiff -> a."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.is_file() else name


def store_paths(slides: Sequence[Path], out: Path) -> list[Path]:
    """Where each slide's store goes: `out` itself when it ends in .zarr (one slide), else out/<stem>.zarr."""
    if out.suffix == ".zarr":
        if len(slides) != 1:
            raise WsisegError(f"--out {out} names one store but {len(slides)} slides were given: pass a folder")
        return [out]
    paths = [out / f"{slide_stem(Path(s))}.zarr" for s in slides]
    seen: dict[Path, Path] = {}
    for slide, path in zip(slides, paths):
        if path in seen:
            raise WsisegError(f"{slide} and {seen[path]} would both be stored as {path}: rename one of them")
        seen[path] = Path(slide)
    return paths


def tile_slides(
    slides: Sequence[str | Path],
    out: str | Path,
    mpp: float,
    *,
    slide_mpp: float | None = None,
    tile: int = 512,
    workers: int | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    skip_errors: bool = False,
    tissue_mask_path: str | Path | None = None,
    tissue_options: dict[str, Any] | None = None,
    progress: bool = True,
    tissue: str | Path = "auto",
) -> list[TileResult]:
    """Tile several slides, a store each, sharing one dask cluster; with `skip_errors`, go on past bad ones.

    Every slide is checked (opens, has an MPP, output writable) before any tiling starts.
    """
    _check_workers(workers)
    paths = [Path(s) for s in slides]
    if not paths:
        raise WsisegError("no slides given: pass one or more slide files")
    tissue = check_tissue_option(tissue_mask_path if tissue_mask_path is not None else tissue)
    if isinstance(tissue, Path) and len(paths) > 1:
        raise WsisegError("a tissue mask file applies to one slide: tile the slides one at a time")
    stores = store_paths(paths, Path(out))
    results: list[TileResult] = []
    ready: list[tuple[Slide, Path]] = []
    for path, store in zip(paths, stores):
        try:
            slide = open_slide(path, slide_mpp)
            size = slide.size_at(mpp)
            check_writable(store, overwrite)
            ready.append((slide, store))
            results.append(TileResult(path, store, "pending", size=size))
        except WsisegError as error:
            if not skip_errors:
                raise
            log.error("%s", error)
            results.append(TileResult(path, store, "failed", message=str(error)))
    pending = [r for r in results if r.status == "pending"]
    with dask_client(workers, scheduler) if pending else nullcontext() as client:
        for (slide, store), result in zip(ready, pending):
            started = time.perf_counter()
            try:
                done = tile_slide(
                    slide, store, mpp, tile=tile, overwrite=overwrite, tissue=tissue,
                    tissue_options=tissue_options, client=client, workers=workers, progress=progress,
                )
                result.tiles = len(done.tissue_tiles())
                result.status = "done" if result.tiles else "empty"
            except WsisegError as error:
                if not skip_errors:
                    raise
                log.error("%s", error)
                result.status, result.message = "failed", str(error)
            finally:
                slide.close()
            result.seconds = time.perf_counter() - started
    return results


def summary_rows(results: Sequence[TileResult]) -> list[tuple[str, ...]]:
    """Rows (slide, status, size, tiles, seconds, store or message) for the summary table."""
    return [
        (
            r.slide.name,
            r.status,
            f"{r.size[0]}x{r.size[1]}" if r.size != (0, 0) else "-",
            str(r.tiles),
            f"{r.seconds:.1f}",
            r.message if r.status == "failed" else str(r.store),
        )
        for r in results
    ]
