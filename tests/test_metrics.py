"""Confusion-matrix metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsiseg.metrics import MetricAccumulator, bootstrap_intervals, confusion_matrix, metrics_from_confusion


def test_confusion_matrix_counts_and_ignores() -> None:
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    cm = confusion_matrix(pred, target, 3, ignore_index=255)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    torch = pytest.importorskip("torch")
    assert confusion_matrix(torch.tensor(pred), torch.tensor(target), 3, 255).tolist() == cm.tolist()


def test_confusion_matrix_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="outside 0..1"):
        confusion_matrix(np.array([0, 1]), np.array([0, 2]), 2, ignore_index=255)


def test_metrics_match_hand_computation() -> None:
    # rows = truth, columns = prediction
    cm = np.array([[50, 10], [5, 35]])
    m = metrics_from_confusion(cm)
    iou = [50 / 65, 35 / 50]
    dice = [100 / 115, 70 / 85]
    assert m["miou"] == pytest.approx(np.mean(iou))
    assert m["mdice"] == pytest.approx(np.mean(dice))
    assert m["dice_no_bg"] == pytest.approx(dice[1])
    assert m["dice_foreground"] == pytest.approx(dice[1])
    assert m["pixel_acc"] == pytest.approx(0.85)
    assert m["mean_acc"] == pytest.approx(np.mean([50 / 60, 35 / 40]))
    assert m["precision"] == pytest.approx(np.mean([50 / 55, 35 / 45]))
    assert m["fwiou"] == pytest.approx(0.6 * iou[0] + 0.4 * iou[1])
    expected = (60 * 55 + 40 * 45) / 100**2
    assert m["kappa"] == pytest.approx((0.85 - expected) / (1 - expected))
    assert m["per_class"]["f1"] == pytest.approx(dice)
    assert m["per_class"]["support"] == [60, 40]


def test_absent_classes_are_excluded_and_foreground_merges_classes() -> None:
    cm = np.array([[8, 1, 0, 0], [1, 3, 1, 0], [0, 2, 4, 0], [0, 0, 0, 0]])
    m = metrics_from_confusion(cm)
    assert math.isnan(m["per_class"]["iou"][3])
    assert m["miou"] == pytest.approx(np.nanmean(m["per_class"]["iou"][:3]))
    # merged foreground: tp = 3+1+2+4, fp = 1, fn = 1
    assert m["dice_foreground"] == pytest.approx(20 / 22)


def test_trivial_predictor_scores() -> None:
    target = np.zeros((10, 10), dtype=int)
    target[:3] = 1
    all_background = metrics_from_confusion(confusion_matrix(np.zeros_like(target), target, 2))
    assert all_background["dice_foreground"] == 0.0
    assert all_background["kappa"] == pytest.approx(0.0)
    assert all_background["pixel_acc"] == pytest.approx(0.7)


def test_accumulator_and_bootstrap() -> None:
    rng = np.random.default_rng(0)
    accumulator = MetricAccumulator(3, keep_per_image=True, class_names=["bg", "a", "b"])
    for _ in range(6):
        target = rng.integers(0, 3, (16, 16))
        pred = np.where(rng.random((16, 16)) < 0.7, target, rng.integers(0, 3, (16, 16)))
        accumulator.update(pred, target)
    result = accumulator.compute(bootstrap=200)
    assert result["class_names"] == ["bg", "a", "b"]
    assert np.asarray(result["confusion_matrix"]).sum() == 6 * 256
    low, high = result["ci95"]["mdice"]
    assert low <= result["mdice"] <= high
    assert high - low > 0
    assert bootstrap_intervals([]) == {}
