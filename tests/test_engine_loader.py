"""The window loader: uint8 batches in reused buffers, converted to float by the batch runner, and a user
error met while reading a window reaching the caller as its one-line WsisegError."""

from __future__ import annotations

import numpy as np
import pytest

import torch

from wsiseg.engine.loader import PREFETCH_BATCHES, iterate_batches
from wsiseg.engine.predictors import BatchRunner
from wsiseg.errors import WsisegError


class DamagedSource:
    """A source whose windows right of x = 16 lie on a damaged region (as a corrupt slide tile)."""

    def read(self, x: int, y: int, width: int, height: int, mpp: float) -> np.ndarray:
        if x >= 16:
            raise WsisegError(f"damaged.svs is corrupt at ({x}, {y}): re-scan or re-export the slide")
        return np.full((height, width, 3), 200, np.uint8)


@pytest.mark.parametrize("workers", [0, 1])
def test_reader_error_is_the_original_one_line_error(workers: int) -> None:
    positions = [(0, 0), (8, 0), (16, 0), (24, 0)]
    batches = iterate_batches(DamagedSource(), positions, window=8, mpp=1.0, batch_size=2, workers=workers,
                              device="cpu")
    indices, batch = next(batches)
    assert indices == [0, 1] and batch.shape == (2, 3, 8, 8) and batch.dtype == torch.uint8 and int(batch.max()) == 200
    with pytest.raises(WsisegError) as raised:
        next(batches)
    assert str(raised.value) == "damaged.svs is corrupt at (16, 0): re-scan or re-export the slide"


class NumberedSource:
    """Window i (at x = i) is filled with the value i, so every window can be told apart."""

    def read(self, x: int, y: int, width: int, height: int, mpp: float) -> np.ndarray:
        return np.full((height, width, 3), x, np.uint8)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_batches_in_reused_buffers_hold_their_own_windows(workers: int) -> None:
    positions = [(i, 0) for i in range(62)]  # 21 batches of 3, the last of 2
    seen, buffers = [], set()
    for indices, batch in iterate_batches(NumberedSource(), positions, window=4, mpp=1.0, batch_size=3,
                                          workers=workers, device="cpu"):
        assert batch.shape == (len(indices), 3, 4, 4) and batch.stride()[1] == 1  # channels-last in memory
        assert [int(window.min()) for window in batch] == [int(window.max()) for window in batch] == indices
        seen += indices
        buffers.add(batch.data_ptr())
    assert seen == list(range(62))
    # buffers come back and are filled again: no more of them than batches in flight (and the short last one)
    assert len(buffers) <= max(workers, 1) * PREFETCH_BATCHES + 2 < 21


class Recorder:
    num_outputs, class_names, colors = 1, ["a"], None

    def __init__(self, uint8_input: bool = False) -> None:
        self.uint8_input = uint8_input
        self.inputs: list[torch.Tensor] = []

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        self.inputs.append(batch.clone())
        return batch[:, :1].float()


def test_batch_runner_converts_uint8_as_float_division_does() -> None:
    pixels = torch.arange(256, dtype=torch.uint8).repeat(5 * 3 * 4 * 4 // 256 + 1)[: 5 * 4 * 4 * 3]
    batch = pixels.reshape(5, 4, 4, 3).permute(0, 3, 1, 2)  # the loader's layout
    expected = batch.float().div_(255.0)
    recorder = Recorder()
    runner = BatchRunner(recorder, 2)  # pieces of 2, 2 and 1 windows share one float buffer
    runner(batch)
    assert [tuple(x.shape) for x in recorder.inputs] == [(2, 3, 4, 4), (2, 3, 4, 4), (1, 3, 4, 4)]
    converted = torch.cat(recorder.inputs)
    assert converted.dtype == torch.float32 and torch.equal(converted, expected)  # bit for bit
    assert recorder.inputs[0].stride() == expected[:2].stride()
    raw = Recorder(uint8_input=True)
    BatchRunner(raw, 8)(batch)
    assert raw.inputs[0].dtype == torch.uint8 and torch.equal(raw.inputs[0], batch)
    floats = Recorder()
    BatchRunner(floats, 8)(expected)
    assert torch.equal(floats.inputs[0], expected)  # float batches pass unchanged
