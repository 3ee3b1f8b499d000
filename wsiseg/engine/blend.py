"""Window blending: window weights and the streaming row-stripe blender.

Scores of overlapping windows are combined per pixel as sum(w * p) / sum(w). The streaming
blender (torch, so it runs on the GPU next to the model) keeps an accumulator only one window
tall: windows arrive in the order of their top row, and the rows above the next window's top
row are final as soon as it arrives, so they are handed to a sink and forgotten. Peak memory
grows with the image width, never with its height.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from wsiseg.errors import WsisegError

BLEND_MODES = ("gaussian", "constant")
# sigma of the Gaussian weight as a fraction of the window side
GAUSSIAN_SIGMA_SCALE = 0.125
# floor of the weights so that every covered pixel has a positive weight sum
MIN_WEIGHT = 1e-4


def window_weights(window: int | tuple[int, int], mode: str = "gaussian") -> np.ndarray:
    """Per-pixel weights (h, w) float32 of one window: a Gaussian peaking at 1 in the centre, or ones."""
    height, width = (window, window) if isinstance(window, int) else window
    if mode == "constant":
        return np.ones((height, width), dtype=np.float32)
    if mode != "gaussian":
        raise WsisegError(f"unknown blend mode {mode!r}: choose one of {', '.join(BLEND_MODES)}")

    def profile(n: int) -> np.ndarray:
        centre = (n - 1) / 2.0
        sigma = max(n * GAUSSIAN_SIGMA_SCALE, 1e-6)
        return np.exp(-0.5 * ((np.arange(n) - centre) / sigma) ** 2)

    weights = np.outer(profile(height), profile(width))
    weights /= weights.max()
    return np.maximum(weights, MIN_WEIGHT).astype(np.float32)


# sink(y0, labels (rows, W) numpy, probabilities (K, rows, W) float32 numpy or None): once per finished stripe
StripeSink = Callable[[int, np.ndarray, "np.ndarray | None"], None]


class StripeBlender:
    """Blend windows arriving in row order into finished row stripes, on any torch device.

    The accumulator holds one window's height of rows. Windows are added with `add` in the
    order of their top row; `next_row(y)` declares that every later window starts at row y or
    below, which finalises the rows above y and hands them to `sink` (labels, and the
    normalised scores when `keep_probabilities`); `close()` finalises the rest. `start_row` > 0
    resumes a run whose rows above it are already written: contributions above it are dropped.
    Per pixel, contributions are summed in the order the windows arrive, exactly as
    `blend_in_memory` does.
    """

    def __init__(
        self,
        width: int,
        height: int,
        window: int,
        num_outputs: int,
        weights: np.ndarray,
        sink: StripeSink,
        background: int = 0,
        start_row: int = 0,
        device: Any = "cpu",
        keep_probabilities: bool = False,
    ) -> None:
        import torch

        self.width = width
        self.height = height
        self.sink = sink
        self.background = background
        self.keep_probabilities = keep_probabilities
        self.top = start_row  # first image row held by the accumulator
        rows = max(min(window, height - start_row), 1)
        self.weights = torch.as_tensor(weights, dtype=torch.float32, device=device)
        self.total = torch.zeros((num_outputs, rows, width), dtype=torch.float32, device=device)
        self.weight_sum = torch.zeros((rows, width), dtype=torch.float32, device=device)

    def add(self, score: Any, x: int, y: int) -> None:
        """Add one window's scores (K, h, w) tensor at (x, y); rows above the accumulator are ignored."""
        if y > self.top:
            self.next_row(y)
        skip = self.top - y
        h = min(score.shape[1], self.height - y) - skip
        w = min(score.shape[2], self.width - x)
        if h <= 0 or w <= 0:
            return
        weights = self.weights[skip : skip + h, :w]
        self.total[:, :h, x : x + w] += score[:, skip : skip + h, :w] * weights
        self.weight_sum[:h, x : x + w] += weights

    def next_row(self, y: int) -> None:
        """Every later window starts at row `y` or below: finalise and hand over the rows above it."""
        import torch

        y = min(y, self.height)
        rows = self.total.shape[1]
        while self.top < y:
            count = min(y - self.top, rows)
            total, weight_sum = self.total[:, :count], self.weight_sum[:count]
            covered = weight_sum > 0
            probabilities = total / torch.where(covered, weight_sum, torch.ones_like(weight_sum))[None]
            labels = torch.argmax(probabilities, dim=0)
            labels[~covered] = self.background
            self.sink(
                self.top,
                labels.to(torch.int32).cpu().numpy(),
                probabilities.cpu().numpy() if self.keep_probabilities else None,
            )
            if count < rows:
                self.total[:, : rows - count] = self.total[:, count:].clone()
                self.weight_sum[: rows - count] = self.weight_sum[count:].clone()
            self.total[:, rows - count :] = 0
            self.weight_sum[rows - count :] = 0
            self.top += count

    def close(self) -> None:
        """Finalise every remaining row."""
        self.next_row(self.height)
