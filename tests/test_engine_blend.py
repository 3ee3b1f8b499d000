"""The streaming row-stripe blender equals the plain in-memory blend, also when resumed midway."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.blend_reference import blend_in_memory, finalise
from wsiseg.engine.blend import (
    StripeBlender,
    finalise_numpy,
    finalise_torch,
    first_argmax,
    label_dtype,
    window_weights,
)
from wsiseg.errors import WsisegError
from wsiseg.slide.grid import Grid


def test_weights() -> None:
    gaussian = window_weights(64)
    assert gaussian.shape == (64, 64) and gaussian.dtype == np.float32
    assert gaussian.max() == pytest.approx(1.0, abs=1e-3) and gaussian.min() > 0
    assert np.allclose(gaussian, gaussian.T) and np.allclose(gaussian, gaussian[::-1, ::-1])
    assert gaussian[32, 32] > gaussian[32, 8] > gaussian[0, 0]
    assert (window_weights((8, 16), "constant") == 1).all()
    with pytest.raises(WsisegError, match="unknown blend .median.: use one of gaussian, constant"):
        window_weights(8, "median")


def _stream(scores, positions, height, width, window, weights, start_row=0, background=0):
    labels = np.full((height, width), -1)
    probabilities = np.full((scores[0].shape[0], height, width), -1.0, np.float32)
    calls = []

    def sink(y0, rows, probs):
        calls.append((y0, rows.shape[0]))
        labels[y0 : y0 + rows.shape[0]] = rows
        probabilities[:, y0 : y0 + rows.shape[0]] = probs

    blender = StripeBlender(width, height, window, scores[0].shape[0], weights, sink, background=background,
                            start_row=start_row, keep_probabilities=True)
    for score, (x, y) in zip(scores, positions):
        if y + window > start_row:
            blender.add(torch.from_numpy(score), x, y)
    blender.close()
    assert blender.total.shape[1] <= window  # bounded: never taller than one window
    return labels, probabilities, calls


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_stream_equals_in_memory(blend: str) -> None:
    rng = np.random.default_rng(3)
    height, width, window = 301, 233, 40
    grid = Grid.from_overlap(width, height, window, 0.3)
    # a ragged subset, as tissue windows are: whole rows of windows missing too
    positions = [(x, y) for x, y in grid.positions() if rng.random() < 0.7 and y not in grid.ys[3:5]]
    scores = [rng.random((4, window, window)).astype(np.float32) for _ in positions]
    weights = window_weights(window, blend)
    total, weight_sum = blend_in_memory(scores, positions, height, width, weights)
    expected_labels, expected_probs = finalise(total, weight_sum, background=2)
    assert (weight_sum == 0).any()  # some background left uncovered
    for start_row in (0, 97, 280):
        labels, probabilities, calls = _stream(scores, positions, height, width, window, weights, start_row, 2)
        assert np.array_equal(labels[start_row:], expected_labels[start_row:])
        assert np.array_equal(probabilities[:, start_row:], expected_probs[:, start_row:])
        assert (labels[:start_row] == -1).all()  # rows above the resume point are not produced again
        assert calls[0][0] == start_row and sum(n for _, n in calls) == height - start_row
    assert (expected_labels[weight_sum == 0] == 2).all()


def test_image_smaller_than_window() -> None:
    rng = np.random.default_rng(0)
    scores = [rng.random((3, 64, 64)).astype(np.float32)]
    weights = window_weights(64)
    total, weight_sum = blend_in_memory(scores, [(0, 0)], 20, 30, weights)
    expected, _ = finalise(total, weight_sum)
    labels, _, _ = _stream(scores, [(0, 0)], 20, 30, 64, weights)
    assert np.array_equal(labels, expected) and labels.shape == (20, 30)


def test_stream_equals_in_memory_with_ties() -> None:
    """Scores on a coarse grid make equal class scores common: the first maximum wins, as in np.argmax."""
    rng = np.random.default_rng(5)
    height, width, window = 150, 190, 32
    positions = Grid.from_overlap(width, height, window, 0.25).positions()
    scores = [(rng.integers(0, 3, (5, window, window)) / 2).astype(np.float32) for _ in positions]
    weights = window_weights(window, "constant")
    total, weight_sum = blend_in_memory(scores, positions, height, width, weights)
    expected, _ = finalise(total, weight_sum)
    probabilities = total / weight_sum
    assert (np.sort(probabilities, axis=0)[-1] == np.sort(probabilities, axis=0)[-2]).mean() > 0.2  # many ties
    labels, _, _ = _stream(scores, positions, height, width, window, weights)
    assert np.array_equal(labels, expected)


def test_first_argmax_equals_numpy_argmax() -> None:
    rng = np.random.default_rng(7)
    for classes, shape in ((1, (3, 5)), (2, (4, 7)), (6, (9, 300)), (300, (2, 3))):
        scores = rng.integers(0, 4, (classes, *shape)).astype(np.float32)
        out = np.empty(shape, label_dtype(classes))
        assert np.array_equal(first_argmax(scores, out), np.argmax(scores, axis=0))
    scores = rng.random((4, 6, 8)).astype(np.float32)
    scores[2, 1, 1] = scores[3, 1, 1] = scores[1, 2, 3] = np.nan  # NaN counts as the maximum, the first one wins
    labels = first_argmax(scores, np.empty((6, 8), np.uint8))
    assert np.array_equal(labels, np.argmax(scores, axis=0)) and labels[1, 1] == 2 and labels[2, 3] == 1
    assert label_dtype(256) == np.uint8 and label_dtype(257) == np.uint16


def test_torch_finalise_equals_numpy_finalise() -> None:
    """The device path (torch argmax, used on GPUs) gives the CPU path's labels and probabilities."""
    rng = np.random.default_rng(9)
    total = (rng.integers(0, 5, (4, 70, 2100)) / 4).astype(np.float32)  # several finalise blocks, with ties
    weight_sum = rng.choice([0, 0.5, 1, 2], (70, 2100)).astype(np.float32)
    expected_labels, expected_probs = finalise(total, weight_sum, background=3)
    probabilities = np.empty_like(total)
    labels = finalise_numpy(total, weight_sum, 3, probabilities)
    assert labels.dtype == np.uint8 and np.array_equal(labels, expected_labels)
    assert np.array_equal(probabilities, expected_probs)
    torch_labels, torch_probs = finalise_torch(torch.from_numpy(total), torch.from_numpy(weight_sum), 3, True)
    assert np.array_equal(torch_labels, expected_labels) and np.array_equal(torch_probs, expected_probs)
