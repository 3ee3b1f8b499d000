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


# sink(y0, labels (rows, W) unsigned-int numpy, probabilities (K, rows, W) float32 numpy or None): once per stripe
StripeSink = Callable[[int, np.ndarray, "np.ndarray | None"], None]

# Stripes are finalised on the CPU in blocks of about this many pixels, so that the scores of a block
# stay in the cache while its K classes are compared.
FINALISE_BLOCK_PIXELS = 1 << 16


def label_dtype(num_outputs: int) -> np.dtype:
    """The smallest unsigned integer type that holds the labels 0..num_outputs-1."""
    return np.dtype(np.uint8 if num_outputs <= 256 else np.uint16 if num_outputs <= 65536 else np.uint32)


def first_argmax(scores: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`np.argmax(scores, axis=0)` of (K, ...) float scores into the unsigned array `out`: the first maximum wins.

    One pass per class with vectorised ufuncs instead of a reduction over the outer axis (the slow
    case of both numpy and torch on the CPU). The label is updated without branches: out += (k - out)
    * (score > best), in wrapping unsigned arithmetic. NaN counts as the maximum, as in `np.argmax`.
    """
    best = scores[0].copy()
    greater = np.empty(best.shape, bool)
    step = np.empty(out.shape, out.dtype)
    out[...] = 0
    for k in range(1, scores.shape[0]):
        np.greater(scores[k], best, out=greater)
        np.subtract(out.dtype.type(k), out, out=step)
        np.multiply(step, greater, out=step, casting="unsafe")
        out += step
        np.maximum(best, scores[k], out=best)  # NaN propagates, so it shows in `best` below
    if np.isnan(best).any():
        out[...] = np.argmax(scores, axis=0)
    return out


def finalise_numpy(
    total: np.ndarray, weight_sum: np.ndarray, background: int, probabilities: np.ndarray | None = None
) -> np.ndarray:
    """Labels of blended rows on the CPU: argmax of total / weight_sum, `background` where weight_sum is 0.

    The normalised scores go to `probabilities` (K, rows, W) when given. Rows are done in blocks
    that stay in the cache.
    """
    num_outputs, rows, width = total.shape
    labels = np.empty((rows, width), label_dtype(num_outputs))
    block = max(1, FINALISE_BLOCK_PIXELS // max(width, 1))
    scratch = np.empty((num_outputs, min(block, rows), width), np.float32) if probabilities is None else None
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        weights = weight_sum[r0:r1]
        uncovered = weights == 0
        target = probabilities[:, r0:r1] if probabilities is not None else scratch[:, : r1 - r0]
        np.divide(total[:, r0:r1], np.where(uncovered, np.float32(1), weights), out=target)
        first_argmax(target, labels[r0:r1])
        np.copyto(labels[r0:r1], background, where=uncovered, casting="unsafe")
    return labels


def finalise_torch(total: Any, weight_sum: Any, background: int, keep_probabilities: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """`finalise_numpy` with torch ops on the accumulator's device (fast argmax there): labels, probabilities."""
    import torch

    covered = weight_sum > 0
    probabilities = total / torch.where(covered, weight_sum, torch.ones_like(weight_sum))[None]
    labels = torch.argmax(probabilities, dim=0)
    labels[~covered] = background
    numpy_labels = labels.cpu().numpy().astype(label_dtype(total.shape[0]))
    return numpy_labels, probabilities.cpu().numpy() if keep_probabilities else None


class StripeBlender:
    """Blend windows arriving in row order into finished row stripes, on any torch device.

    The accumulator holds one window's height of rows. Windows are added with `add` in the
    order of their top row; `next_row(y)` declares that every later window starts at row y or
    below, which finalises the rows above y and hands them to `sink` (labels, and the
    normalised scores when `keep_probabilities`); `close()` finalises the rest. `start_row` > 0
    resumes a run whose rows above it are already written: contributions above it are dropped.
    Per pixel, contributions are summed in the order the windows arrive, each product w * p
    rounded to float32 before it is added, exactly as `blend_in_memory` does.
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
        # w * p of one window, reused: no allocation per window
        self._product = torch.empty((num_outputs, *self.weights.shape), dtype=torch.float32, device=device)

    def add(self, score: Any, x: int, y: int) -> None:
        """Add one window's scores (K, h, w) tensor at (x, y); rows above the accumulator are ignored."""
        import torch

        if y > self.top:
            self.next_row(y)
        skip = self.top - y
        h = min(score.shape[1], self.height - y) - skip
        w = min(score.shape[2], self.width - x)
        if h <= 0 or w <= 0:
            return
        weights = self.weights[skip : skip + h, :w]
        product = self._product[:, :h, :w]
        torch.mul(score[:, skip : skip + h, :w], weights, out=product)
        self.total[:, :h, x : x + w].add_(product)
        self.weight_sum[:h, x : x + w].add_(weights)

    def next_row(self, y: int) -> None:
        """Every later window starts at row `y` or below: finalise and hand over the rows above it."""
        y = min(y, self.height)
        rows = self.total.shape[1]
        while self.top < y:
            count = min(y - self.top, rows)
            total, weight_sum = self.total[:, :count], self.weight_sum[:count]
            if self.total.device.type == "cpu":
                probabilities = np.empty(total.shape, np.float32) if self.keep_probabilities else None
                labels = finalise_numpy(total.numpy(), weight_sum.numpy(), self.background, probabilities)
            else:
                labels, probabilities = finalise_torch(total, weight_sum, self.background, self.keep_probabilities)
            self.sink(self.top, labels, probabilities)
            self._shift(count)
            self.top += count

    def _shift(self, count: int) -> None:
        """Move the accumulator up by `count` finished rows and clear the rows freed at its bottom."""
        rows = self.total.shape[1]
        kept = rows - count
        if kept > 0:
            if kept <= count:  # source and destination rows do not overlap
                self.total[:, :kept].copy_(self.total[:, count:])
                self.weight_sum[:kept].copy_(self.weight_sum[count:])
            else:
                self.total[:, :kept] = self.total[:, count:].clone()
                self.weight_sum[:kept] = self.weight_sum[count:].clone()
        self.total[:, kept:].zero_()
        self.weight_sum[kept:].zero_()

    def close(self) -> None:
        """Finalise every remaining row."""
        self.next_row(self.height)
