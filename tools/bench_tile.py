"""Benchmark `wsiseg tile` against a plain loop of OpenSlide read_region over the same tiles.

The slide is a mosaic of the real CMU sample (N x N copies, a JPEG-compressed pyramidal TIFF, as
scanners write), tiled at its base MPP so both sides read exactly the same level-0 regions. For
each worker count the plain loop runs in that many processes (each opening the slide once) and
`tile_slide` runs on a dask LocalCluster of that many worker processes; the two alternate, and
the best of --repeats runs counts (the machine may be shared). Reported: tiles/s of the
whole `tile_slide` call (tissue detection, QC picture, store, tiles) and of its tiling phase
alone, the overhead of the tiling phase against the plain loop in wall time and in CPU time of the
reading processes (the robust figure on a shared machine), cluster start-up time, and peak
resident memory (this process plus all children, sampled every 20 ms).

    .venv/bin/python tools/bench_tile.py --mosaic 2 4 --workers 1 2
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import re
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openslide
import psutil
import tifffile

TILE = 512


class PeakMemory:
    """Peak RSS of this process and all its descendants, sampled in a background thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_mosaic(source: Path, copies: int, target: Path) -> None:
    """Write copies x copies of the source slide as a tiled JPEG pyramidal TIFF that OpenSlide reads."""
    from wsiseg.slide import open_slide

    with open_slide(source) as slide:
        image = slide.read(0, 0, *slide.level_dimensions[0], slide.mpp)
        mpp = slide.mpp
    mosaic = np.tile(image, (copies, copies, 1))
    resolution = (1e4 / mpp, 1e4 / mpp)
    options = {"tile": (256, 256), "compression": "jpeg", "compressionargs": {"level": 90}, "photometric": "rgb"}
    with tifffile.TiffWriter(target, bigtiff=True) as tif:
        level = mosaic
        for index in range(4):
            tif.write(level, subfiletype=1 if index else 0, resolution=(resolution[0] / 2**index,
                      resolution[1] / 2**index), resolutionunit="CENTIMETER", **options)
            h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            level = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)


_HANDLE: openslide.OpenSlide | None = None


def _open(path: str) -> None:
    global _HANDLE
    _HANDLE = openslide.OpenSlide(path)


def _read(positions: list[tuple[int, int]]) -> int:
    assert _HANDLE is not None
    for x, y in positions:
        np.asarray(_HANDLE.read_region((x, y), 0, (TILE, TILE)))
    return len(positions)


def plain_loop(pool, positions: list[tuple[int, int]]) -> float:
    """Seconds for the pool's processes (started, slide open) to read_region every position once."""
    chunks = [positions[i : i + 16] for i in range(0, len(positions), 16)]
    started = time.perf_counter()
    assert sum(pool.map(_read, chunks, chunksize=1)) == len(positions)
    return time.perf_counter() - started


class PhaseTimer(logging.Handler):
    """Picks the tiling-phase time out of tile_slide's 'wrote N tiles in S s' log line."""

    seconds = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        match = re.search(r"wrote \d+ tiles in ([\d.]+) s", record.getMessage())
        if match:
            self.seconds = float(match.group(1))


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds used so far by these processes."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def bench(path: Path, workers: int, out: Path, repeats: int) -> dict:
    """Best of `repeats` alternating runs of the plain loop and tile_slide, at `workers` processes each.

    Wall times count the best run; CPU seconds (robust on a shared machine) are those of the
    reading processes alone: the dask nannies and workers, or the plain loop's pool.
    """
    from wsiseg.progress import get_logger
    from wsiseg.driver import dask_client
    from wsiseg.store.tiling import tile_slide

    timer = PhaseTimer()
    get_logger().addHandler(timer)
    get_logger().setLevel(logging.INFO)
    best = {"plain": float("inf"), "phase": float("inf"), "total": float("inf"),
            "plain_cpu": float("inf"), "wsiseg_cpu": float("inf")}
    context = multiprocessing.get_context("spawn")
    me = psutil.Process()
    with PeakMemory() as memory:
        started = time.perf_counter()
        with dask_client(None, local_workers=workers) as client:
            client.run(lambda: __import__("wsiseg.store.tiles"))
            best["startup"] = time.perf_counter() - started
            dask_processes = me.children(recursive=True)
            with context.Pool(workers, initializer=_open, initargs=(str(path),)) as pool:
                pool.map(_read, [[]] * workers)
                pool_processes = [p for p in me.children(recursive=True) if p not in dask_processes]
                for _ in range(repeats):
                    begun, cpu = time.perf_counter(), cpu_seconds(dask_processes)
                    store = tile_slide(path, out, _mpp(path), tile=TILE, client=client, progress=False, overwrite=True)
                    best["total"] = min(best["total"], time.perf_counter() - begun)
                    best["wsiseg_cpu"] = min(best["wsiseg_cpu"], cpu_seconds(dask_processes) - cpu)
                    best["phase"] = min(best["phase"], timer.seconds)
                    positions = store.tissue_tiles()
                    cpu = cpu_seconds(pool_processes)
                    best["plain"] = min(best["plain"], plain_loop(pool, positions))
                    best["plain_cpu"] = min(best["plain_cpu"], cpu_seconds(pool_processes) - cpu)
    get_logger().removeHandler(timer)
    return {**best, "tiles": len(positions), "size": (store.width, store.height), "peak": memory.peak}


def _mpp(path: Path) -> float:
    return float(openslide.OpenSlide(str(path)).properties[openslide.PROPERTY_NAME_MPP_X])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mosaic", type=int, nargs="+", default=[2, 4], help="copies per side of the CMU sample")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best one counts")
    args = parser.parse_args()
    from wsiseg.samples import fetch_samples

    source = fetch_samples()["cmu_svs"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for copies in args.mosaic:
            slide = Path(folder) / f"mosaic{copies}.tif"
            maker = multiprocessing.get_context("spawn").Process(target=make_mosaic, args=(source, copies, slide))
            maker.start()
            maker.join()
            for workers in args.workers:
                result = bench(slide, workers, Path(folder) / f"m{copies}w{workers}.zarr", args.repeats)
                n = result["tiles"]
                rows.append((
                    f"{copies}x{copies}", "x".join(map(str, result["size"])), workers, n,
                    f"{n / result['plain']:.1f}", f"{n / result['phase']:.1f}", f"{n / result['total']:.1f}",
                    f"{100 * (result['phase'] / result['plain'] - 1):+.1f}%",
                    f"{1000 * result['plain_cpu'] / n:.1f}", f"{1000 * result['wsiseg_cpu'] / n:.1f}",
                    f"{100 * (result['wsiseg_cpu'] / result['plain_cpu'] - 1):+.1f}%",
                    f"{result['startup']:.1f}", f"{result['peak'] / 2**20:.0f}",
                ))
    header = ("mosaic", "size", "workers", "tiles", "plain/s", "wsiseg tiling/s", "wsiseg total/s",
              "wall overhead", "plain CPU ms/tile", "wsiseg CPU ms/tile", "CPU overhead", "cluster start s",
              "peak RSS MiB")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
