"""Window blending: weights, the plain in-memory blend, and the streaming row-stripe blender.

Scores of overlapping windows are combined per pixel as sum(w * p) / sum(w). The streaming
blender keeps an accumulator only one window tall: windows arrive row of windows by row of
windows (top to bottom), and the rows above the next row of windows are final as soon as that
row starts, so they are handed to a sink and forgotten. Peak memory grows with the image width,
never with its height.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def blend_in_memory(
    scores: Sequence[np.ndarray] | np.ndarray,
    positions: Sequence[tuple[int, int]],
    height: int,
    width: int,
    weights: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend window scores (N, K, h, w) placed at (x, y) on a whole canvas: (sum w*p (K,H,W), sum w (H,W)).

    Windows reaching past the canvas are cropped. This is the reference the streaming blender
    must equal, and what in-memory (patch-level) inference uses.
    """
    num_outputs = scores[0].shape[0]
    total = np.zeros((num_outputs, height, width), dtype=np.float32)
    weight_sum = np.zeros((height, width), dtype=np.float32)
    for score, (x, y) in zip(scores, positions):
        h = min(score.shape[1], height - y)
        w = min(score.shape[2], width - x)
        total[:, y : y + h, x : x + w] += score[:, :h, :w] * weights[:h, :w]
        weight_sum[y : y + h, x : x + w] += weights[:h, :w]
    return total, weight_sum


def finalise(total: np.ndarray, weight_sum: np.ndarray, background: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (argmax of sum w*p / sum w; `background` where nothing was predicted) and the normalised scores."""
    covered = weight_sum > 0
    probabilities = total / np.where(covered, weight_sum, 1.0)[None]
    labels = np.argmax(probabilities, axis=0)
    labels[~covered] = background
    return labels, probabilities


# sink(y0, labels (rows, W), probabilities (K, rows, W) float32): called once per finished stripe, top to bottom
StripeSink = Callable[[int, np.ndarray, np.ndarray], None]


class StripeBlender:
    """Blend windows arriving row of windows by row of windows into finished row stripes.

    `row_starts` are the y of every row of windows of the grid, ascending (rows without any
    window, e.g. background, still count: they tell when earlier rows are final). Windows are
    added with `add`; `next_row(y)` declares that every later window starts at y or below, which
    finalises the rows above y; `close()` finalises the rest. `start_row` > 0 resumes a run whose
    rows above it are already written: contributions above it are dropped.
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
    ) -> None:
        self.width = width
        self.height = height
        self.window = window
        self.num_outputs = num_outputs
        self.weights = weights
        self.sink = sink
        self.background = background
        self.top = start_row  # first image row held by the accumulator
        rows = min(window, max(height - start_row, 0))
        self.total = np.zeros((num_outputs, max(rows, 1), width), dtype=np.float32)
        self.weight_sum = np.zeros((max(rows, 1), width), dtype=np.float32)

    def add(self, score: np.ndarray, x: int, y: int) -> None:
        """Add one window's scores (K, h, w) at (x, y); rows above the accumulator are ignored."""
        if y > self.top:
            raise ValueError(f"window at y={y} arrived before rows from {self.top} were finalised")
        skip = self.top - y
        h = min(score.shape[1], self.height - y) - skip
        w = min(score.shape[2], self.width - x)
        if h <= 0 or w <= 0:
            return
        self.total[:, :h, x : x + w] += score[:, skip : skip + h, :w] * self.weights[skip : skip + h, :w]
        self.weight_sum[:h, x : x + w] += self.weights[skip : skip + h, :w]

    def next_row(self, y: int) -> None:
        """Every later window starts at row `y` or below: finalise and hand over the rows above it."""
        y = min(y, self.height)
        rows = self.total.shape[1]
        while self.top < y:
            count = min(y - self.top, rows)
            labels, probabilities = finalise(self.total[:, :count], self.weight_sum[:count], self.background)
            self.sink(self.top, labels, probabilities)
            self.total[:, : rows - count] = self.total[:, count:]
            self.total[:, rows - count :] = 0
            self.weight_sum[: rows - count] = self.weight_sum[count:]
            self.weight_sum[rows - count :] = 0
            self.top += count

    def close(self) -> None:
        """Finalise every remaining row."""
        self.next_row(self.height)
