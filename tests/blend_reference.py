"""The plain in-memory blend that the streaming StripeBlender must equal (a test reference)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def blend_in_memory(
    scores: Sequence[np.ndarray] | np.ndarray,
    positions: Sequence[tuple[int, int]],
    height: int,
    width: int,
    weights: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend window scores (N, K, h, w) placed at (x, y) on a whole canvas: (sum w*p (K,H,W), sum w (H,W)).

    Windows reaching past the canvas are cropped. Written independently of the
    streaming blender, as the reference it must equal.
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
