"""The window loader: reader processes fill batches of windows, pinned for the GPU, prefetched ahead.

Windows are read from anything with `read(x, y, width, height, mpp) -> (h, w, 3) uint8` (a
Slide, or a tile store seen as one). Batches are a fixed partition of the window list, so a
resumed run sees exactly the batches of the first run. Each reader process reopens the source
(slides pickle by path), so no file handle is shared across processes.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from wsiseg.errors import WsisegError

PREFETCH_BATCHES = 4  # batches each reader prepares ahead


def partition(count: int, batch_size: int) -> list[list[int]]:
    """Consecutive batches of window indices: [0..b-1], [b..2b-1], ..."""
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


class WindowDataset:
    """Windows of one source at one MPP, as uint8 (h, w, 3) tensors (a read's WsisegError is returned, not raised).

    Torch re-raises an error of a reader process with its whole traceback in the message; returned,
    the WsisegError reaches the main process as it was and is raised there with its one-line message.
    """

    def __init__(self, source: Any, positions: Sequence[tuple[int, int]], window: int, mpp: float) -> None:
        self.source = source
        self.positions = list(positions)
        self.window = window
        self.mpp = mpp

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> Any:
        import torch

        x, y = self.positions[index]
        try:
            pixels = self.source.read(x, y, self.window, self.window, self.mpp)
        except WsisegError as error:
            return error
        return torch.from_numpy(np.require(pixels, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]))


def _reopen_source(worker_id: int) -> None:
    """In a reader process: replace the inherited source by a fresh copy with its own file handle."""
    import torch

    info = torch.utils.data.get_worker_info()
    dataset = info.dataset
    dataset.source = pickle.loads(pickle.dumps(dataset.source))


def _stack(items: list[Any]) -> Any:
    """The batch tensor, or the first WsisegError one of its windows met."""
    import torch

    errors = [item for item in items if isinstance(item, WsisegError)]
    return errors[0] if errors else torch.stack(items)


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
    """Yield (window indices, (B, 3, h, w) float [0, 1] tensor on `device`) from batch `first_batch` on.

    Reading happens in `workers` processes (none: in this one), batches land in pinned memory
    when the device is CUDA and are copied without blocking; the uint8 -> float conversion
    happens on the device.
    """
    import torch

    device = torch.device(device)
    batches = partition(len(positions), batch_size)[first_batch:]
    if not batches:
        return
    dataset = WindowDataset(source, positions, window, mpp)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_stack,
        pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        worker_init_fn=_reopen_source if workers > 0 else None,
        persistent_workers=False,
    )
    for indices, pixels in zip(batches, loader):
        if isinstance(pixels, WsisegError):
            raise pixels
        batch = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        yield indices, batch
