"""The window loader: a user error met while reading a window reaches the caller as its one-line WsisegError."""

from __future__ import annotations

import numpy as np
import pytest

from wsiseg.engine.loader import iterate_batches
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
    assert indices == [0, 1] and batch.shape == (2, 3, 8, 8) and float(batch.max()) == pytest.approx(200 / 255)
    with pytest.raises(WsisegError) as raised:
        next(batches)
    assert str(raised.value) == "damaged.svs is corrupt at (16, 0): re-scan or re-export the slide"
