"""The window loader: reader threads fill batches of uint8 windows, pinned for the GPU, prefetched ahead.

Windows are read from anything with `read(x, y, width, height, mpp) -> (h, w, 3) uint8` (a
Slide, or a tile store seen as one). Batches are a fixed partition of the window list, so a
resumed run sees exactly the batches of the first run.

Readers are threads, not processes: OpenSlide, tifffile and zarr decode with the GIL released,
so threads read as fast as processes (tools/infra_readers.py measures both), and threads run
where processes cannot start: inside a `dask worker` (a daemonic process), a thread, or any
CLI. Each reader thread reads through its own copy of the source (slides and stores pickle by
path), so no file handle is shared between threads. An error a reader meets (a WsisegError,
an OSError) reaches the caller as it was raised, with its one-line message.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

PREFETCH_BATCHES = 4  # batches each reader prepares ahead (tools/bench_engine_ceiling.py --parts prefetch)
PIN_MEMORY = True  # host batches in pinned memory when the device is CUDA (tools/bench_segment_gpu.py: pinned)
MAX_AUTO_READERS = 8


def partition(count: int, batch_size: int) -> list[list[int]]:
    """Consecutive batches of window indices: [0..b-1], [b..2b-1], ..."""
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def auto_readers(device: Any, cores: int | None = None) -> int:
    """Reader threads for `--workers auto`: on CUDA all cores but one (at most 8) feed the device;
    on CPU the model needs the cores, so one reader overlaps reading with compute."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if str(device).startswith("cuda"):
        return max(1, min(MAX_AUTO_READERS, cores - 1))
    return 1


def parse_workers(value: int | str | None, device: Any) -> int:
    """A reader count from an int, a digit string, or "auto"/None (see `auto_readers`)."""
    from wsiseg.driver import parse_workers_option

    return parse_workers_option(value, lambda: auto_readers(device), "read in the main thread")


class _Readers:
    """Per-thread copies of a source: the first read of each thread opens its own handle."""

    def __init__(self, source: Any) -> None:
        self.blueprint = pickle.dumps(source)
        self.local = threading.local()
        self.opened: list[Any] = []
        self.lock = threading.Lock()

    def get(self) -> Any:
        source = getattr(self.local, "source", None)
        if source is None:
            source = self.local.source = pickle.loads(self.blueprint)
            with self.lock:
                self.opened.append(source)
        return source

    def close(self) -> None:
        for source in self.opened:
            close = getattr(source, "close", None)
            if close is not None:
                close()


class _HostBuffers:
    """Reusable (batch, h, w, 3) uint8 host buffers for the CPU: a fresh buffer per batch costs a page
    fault per 4 KiB in the reader (measured: 0.36 ms of a ~6 ms window read). CUDA batches are taken from
    torch's pinned-memory cache instead, which knows when the asynchronous copy of a batch is done."""

    def __init__(self, shape: tuple[int, ...], pin: bool) -> None:
        self.shape = shape
        self.pin = pin
        self.free: deque[Any] = deque()

    def take(self, count: int) -> Any:
        """A buffer for `count` windows: a reused one on the CPU when `count` is the full batch."""
        import torch

        if count == self.shape[0]:
            try:
                return self.free.popleft()  # deque operations are atomic: safe between reader threads
            except IndexError:
                pass
        return torch.empty((count, *self.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)

    def give_back(self, batch: Any) -> None:
        """`batch` (from `take`) is no longer used: on the CPU it may be filled again."""
        if not self.pin and tuple(batch.shape) == self.shape:
            self.free.append(batch)


def _read_batch(
    source: Any, positions: Sequence[tuple[int, int]], indices: list[int], window: int, mpp: float,
    buffers: _HostBuffers,
) -> Any:
    """The (B, h, w, 3) uint8 tensor of a batch of windows, in a buffer from `buffers`."""
    batch = buffers.take(len(indices))
    target = batch.numpy()
    for row, index in enumerate(indices):
        x, y = positions[index]
        target[row] = source.read(x, y, window, window, mpp)
    return batch


def iterate_batches(
    source: Any,
    positions: Sequence[tuple[int, int]],
    window: int,
    mpp: float,
    batch_size: int,
    workers: int,
    device: Any,
    first_batch: int = 0,
) -> Iterator[tuple[list[int], Any]]:
    """Yield (window indices, (B, 3, h, w) uint8 tensor on `device`) from batch `first_batch` on.

    The windows stay uint8 as read (channels-last in memory): the predictor's batch runner converts
    them to float where the model needs it, on the device. A batch is valid until the next one is
    asked for (its host buffer is then filled again). Reading happens in `workers` threads (none: in
    the calling thread), each keeping up to PREFETCH_BATCHES batches ahead; batches land in pinned
    memory when the device is CUDA and are copied without blocking.
    """
    import torch

    device = torch.device(device)
    pin = PIN_MEMORY and device.type == "cuda"
    batches = partition(len(positions), batch_size)[first_batch:]
    if not batches:
        return
    buffers = _HostBuffers((len(batches[0]), window, window, 3), pin)

    def to_device(pixels: Any) -> Any:
        return pixels.to(device, non_blocking=pin).permute(0, 3, 1, 2)

    if workers == 0:
        for indices in batches:
            pixels = _read_batch(source, positions, indices, window, mpp, buffers)
            yield indices, to_device(pixels)
            buffers.give_back(pixels)
        return
    readers = _Readers(source)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsiseg-reader")
    pending: deque[tuple[list[int], Future]] = deque()
    upcoming = iter(batches)

    def submit(indices: list[int]) -> None:
        pending.append((indices, pool.submit(
            lambda: _read_batch(readers.get(), positions, indices, window, mpp, buffers))))

    try:
        for indices in upcoming:
            submit(indices)
            if len(pending) >= workers * PREFETCH_BATCHES:
                break
        while pending:
            indices, future = pending.popleft()
            pixels = future.result()
            following = next(upcoming, None)
            if following is not None:
                submit(following)
            yield indices, to_device(pixels)
            buffers.give_back(pixels)
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True)
        readers.close()
