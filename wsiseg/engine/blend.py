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

from wsiseg.engine.choices import BLENDS
from wsiseg.errors import WsisegError

# sigma of the Gaussian weight as a fraction of the window side
GAUSSIAN_SIGMA_SCALE = 0.125
# floor of the weights so that every covered pixel has a positive weight sum
MIN_WEIGHT = 1e-4


def window_weights(window: int | tuple[int, int], mode: str = "gaussian") -> np.ndarray:
    """Per-pixel weights (h, w) float32 of one window, by the registered blend `mode`."""
    height, width = (window, window) if isinstance(window, int) else window
    return BLENDS.load(mode)(height, width)


def constant_weights(height: int, width: int) -> np.ndarray:
    """Equal weights: overlapping windows are averaged."""
    return np.ones((height, width), dtype=np.float32)


def gaussian_weights(height: int, width: int) -> np.ndarray:
    """A Gaussian peaking at 1 in the centre, floored so that every covered pixel has a positive weight."""

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
    case of both numpy and torch on the CPU). The label is updated without branches: every label so
    far is below k, so out = max(out, k * (score > best)). NaN counts as the maximum, as in `np.argmax`.
    """
    best = scores[0].copy()
    greater = np.empty(best.shape, bool)
    step = np.empty(out.shape, out.dtype)
    out[...] = 0
    for k in range(1, scores.shape[0]):
        np.greater(scores[k], best, out=greater)
        np.multiply(greater, out.dtype.type(k), out=step)
        np.maximum(out, step, out=out)
        np.maximum(best, scores[k], out=best)  # NaN propagates, so it shows in `best` below
    if np.isnan(best.max()):
        out[...] = np.argmax(scores, axis=0)
    return out


def finalise_numpy(
    total: np.ndarray,
    weight_sum: np.ndarray,
    background: int,
    probabilities: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    clear: bool = False,
) -> np.ndarray:
    """Labels of blended rows on the CPU: argmax of total / weight_sum, `background` where weight_sum is 0.

    The normalised scores go to `probabilities` (K, rows, W) when given, the labels to `labels` when
    given. Rows are done in blocks that stay in the cache; with `clear`, each block of `total` and
    `weight_sum` is zeroed once read, while it is still in the cache.
    """
    num_outputs, rows, width = total.shape
    if labels is None:
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
        if clear:
            total[:, r0:r1] = 0
            weights[...] = 0
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

    The accumulator holds one window's height of rows, as a ring: image row r lives in row
    r % rows, so finishing rows moves nothing and clears them while they are in the cache. On the
    CPU only the columns some window covered are finalised (the rest is background, scores 0, as
    the reference gives). Windows are added with `add` in the order of their top row; `next_row(y)` declares that every later
    window starts at row y or below, which finalises the rows above y and hands them to `sink`
    (labels, and the normalised scores when `keep_probabilities`); `close()` finalises the rest.
    `start_row` > 0 resumes a run whose rows above it are already written: contributions above it
    are dropped. Per pixel, contributions are summed in the order the windows arrive, each product
    w * p rounded to float32 before it is added, exactly as `blend_in_memory` does.
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
        self._spans: list[tuple[int, int, int]] = []  # (x0, x1, bottom row + 1) of the windows in the accumulator

    def _ring(self, y0: int, count: int) -> list[tuple[int, int, int]]:
        """Image rows y0..y0+count-1 (held by the accumulator) as ring slices: (start, stop, rows before it)."""
        rows = self.total.shape[1]
        start = y0 % rows
        first = min(count, rows - start)
        return [(start, start + first, 0)] + ([(0, count - first, first)] if first < count else [])

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
        for start, stop, before in self._ring(self.top, h):
            r0, r1 = skip + before, skip + before + stop - start  # the rows of the window
            weights = self.weights[r0:r1, :w]
            product = self._product[:, : r1 - r0, :w]
            torch.mul(score[:, r0:r1, :w], weights, out=product)
            self.total[:, start:stop, x : x + w].add_(product)
            self.weight_sum[start:stop, x : x + w].add_(weights)
        self._spans.append((x, x + w, self.top + h))

    def _covered_columns(self) -> list[tuple[int, int]]:
        """The column ranges (x0, x1) some window in the accumulator covers, merged, left to right."""
        merged: list[list[int]] = []
        for x0, x1, _ in sorted(self._spans):
            if merged and x0 <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], x1)
            else:
                merged.append([x0, x1])
        return [(x0, x1) for x0, x1 in merged]

    def next_row(self, y: int) -> None:
        """Every later window starts at row `y` or below: finalise and hand over the rows above it."""
        y = min(y, self.height)
        rows = self.total.shape[1]
        while self.top < y:
            count = min(y - self.top, rows)
            pieces = self._ring(self.top, count)
            if self.total.device.type == "cpu":
                labels, probabilities = self._finalise_cpu(pieces, count)
            else:
                labels, probabilities = self._finalise_device(pieces)
            self.sink(self.top, labels, probabilities)
            self.top += count
            self._spans = [span for span in self._spans if span[2] > self.top]

    def _finalise_cpu(self, pieces: list[tuple[int, int, int]], count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (and scores) of the ring slices `pieces`, which are cleared for the rows that follow."""
        total, weight_sum = self.total.numpy(), self.weight_sum.numpy()
        labels = np.full((count, self.width), self.background, label_dtype(total.shape[0]))
        probabilities = np.zeros((total.shape[0], count, self.width), np.float32) if self.keep_probabilities else None
        for x0, x1 in self._covered_columns():
            for start, stop, before in pieces:
                part = slice(before, before + stop - start)
                finalise_numpy(total[:, start:stop, x0:x1], weight_sum[start:stop, x0:x1], self.background,
                               None if probabilities is None else probabilities[:, part, x0:x1], labels[part, x0:x1],
                               clear=True)
        return labels, probabilities

    def _finalise_device(self, pieces: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """`_finalise_cpu` with torch ops on the accumulator's device."""
        import torch

        total = torch.cat([self.total[:, start:stop] for start, stop, _ in pieces], dim=1)
        weight_sum = torch.cat([self.weight_sum[start:stop] for start, stop, _ in pieces])
        result = finalise_torch(total, weight_sum, self.background, self.keep_probabilities)
        for start, stop, _ in pieces:
            self.total[:, start:stop].zero_()
            self.weight_sum[start:stop].zero_()
        return result

    def close(self) -> None:
        """Finalise every remaining row."""
        self.next_row(self.height)
