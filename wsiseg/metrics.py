"""Segmentation metrics from confusion matrices: one module for training, inference and slide evaluation.

Rows of a confusion matrix are the true class, columns the predicted class. Every metric is
computed from the matrix summed over the whole set (never averaged over images); per-image
matrices are kept only for bootstrap confidence intervals.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# summary metric name -> what it is (all are "higher is better")
SUMMARY_METRICS: dict[str, str] = {
    "miou": "mean IoU over classes present in the labels or predictions",
    "mdice": "mean Dice over present classes",
    "dice_no_bg": "mean Dice over present classes except the background class",
    "dice_foreground": "Dice of all non-background classes merged against background",
    "pixel_acc": "pixel accuracy",
    "mean_acc": "mean per-class accuracy (recall)",
    "fwiou": "frequency-weighted IoU",
    "precision": "mean precision over present classes",
    "recall": "mean recall over present classes",
    "f1": "mean F1 over present classes",
    "kappa": "Cohen's kappa",
}
PER_CLASS_METRICS = ("iou", "dice", "precision", "recall", "f1")


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """The (C, C) int64 confusion matrix of label arrays or tensors; pixels at `ignore_index` are skipped.

    Accepts numpy arrays or torch tensors of any matching shape (tensors stay on their device
    for the counting). Labels outside 0..C-1 other than the ignore value are an error.
    """
    if hasattr(pred, "detach"):
        import torch

        pred_t = pred.detach().reshape(-1).long()
        target_t = target.detach().reshape(-1).long().to(pred_t.device)
        if pred_t.shape != target_t.shape:
            raise ValueError(f"prediction has {pred_t.numel()} pixels but target has {target_t.numel()}")
        keep = target_t != ignore_index if ignore_index is not None else torch.ones_like(target_t, dtype=torch.bool)
        pred_t, target_t = pred_t[keep], target_t[keep]
        if pred_t.numel() and (int(pred_t.min()) < 0 or int(pred_t.max()) >= num_classes
                               or int(target_t.min()) < 0 or int(target_t.max()) >= num_classes):
            raise ValueError(f"labels outside 0..{num_classes - 1} found in prediction or target")
        counts = torch.bincount(target_t * num_classes + pred_t, minlength=num_classes * num_classes)
        return counts.cpu().numpy().astype(np.int64).reshape(num_classes, num_classes)
    pred_a = np.asarray(pred).reshape(-1).astype(np.int64)
    target_a = np.asarray(target).reshape(-1).astype(np.int64)
    if pred_a.shape != target_a.shape:
        raise ValueError(f"prediction has {pred_a.size} pixels but target has {target_a.size}")
    if ignore_index is not None:
        keep = target_a != ignore_index
        pred_a, target_a = pred_a[keep], target_a[keep]
    if pred_a.size and (pred_a.min() < 0 or pred_a.max() >= num_classes
                        or target_a.min() < 0 or target_a.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1} found in prediction or target")
    counts = np.bincount(target_a * num_classes + pred_a, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray, present: np.ndarray) -> np.ndarray:
    """numerator / denominator; 0 where the denominator is 0 for a present class, NaN for absent ones."""
    out = np.zeros(len(numerator), dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    out[~present] = np.nan
    return out


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def metrics_from_confusion(cm: np.ndarray, background_index: int | None = 0) -> dict[str, Any]:
    """All summary metrics and per-class values of one confusion matrix.

    A class is "present" when it occurs in the labels or the predictions; means run over
    present classes only; absent classes show NaN per class.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    total = cm.sum()
    present = (gt + predicted) > 0
    fp = predicted - tp
    fn = gt - tp
    iou = _ratio(tp, tp + fp + fn, present)
    dice = _ratio(2 * tp, 2 * tp + fp + fn, present)
    precision = _ratio(tp, predicted, present)
    recall = _ratio(tp, gt, present)
    f1 = _ratio(2 * precision * recall, precision + recall, present)
    without_bg = dice.copy()
    if background_index is not None and 0 <= background_index < len(dice):
        without_bg[background_index] = np.nan
    if total > 0:
        pixel_acc = float(tp.sum() / total)
        expected = float((gt * predicted).sum() / total**2)
        kappa = float((pixel_acc - expected) / (1 - expected)) if expected < 1 else 1.0
        fwiou = float(np.nansum(gt / total * np.nan_to_num(iou)))
    else:
        pixel_acc = kappa = fwiou = float("nan")
    dice_fg = float("nan")
    if background_index is not None and 0 <= background_index < len(dice) and total > 0:
        fg = np.ones(len(dice), dtype=bool)
        fg[background_index] = False
        tp_fg = cm[np.ix_(fg, fg)].sum()
        fp_fg = cm[background_index, fg].sum()
        fn_fg = cm[fg, background_index].sum()
        denominator = 2 * tp_fg + fp_fg + fn_fg
        dice_fg = float(2 * tp_fg / denominator) if denominator > 0 else float("nan")
    return {
        "miou": _nanmean(iou),
        "mdice": _nanmean(dice),
        "dice_no_bg": _nanmean(without_bg),
        "dice_foreground": dice_fg,
        "pixel_acc": pixel_acc,
        "mean_acc": _nanmean(recall),
        "fwiou": fwiou,
        "precision": _nanmean(precision),
        "recall": _nanmean(recall),
        "f1": _nanmean(f1),
        "kappa": kappa,
        "per_class": {
            "iou": iou.tolist(),
            "dice": dice.tolist(),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": gt.astype(np.int64).tolist(),
        },
        "pixels": int(total),
    }


def bootstrap_intervals(per_image: list[np.ndarray], samples: int = 1000, confidence: float = 0.95,
                        seed: int = 0, background_index: int | None = 0) -> dict[str, list[float]]:
    """Percentile confidence intervals of the summary metrics, resampling images with replacement."""
    if not per_image:
        return {}
    stack = np.stack([np.asarray(cm, dtype=np.float64) for cm in per_image])
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in SUMMARY_METRICS}
    for _ in range(samples):
        pick = rng.integers(0, len(stack), size=len(stack))
        values = metrics_from_confusion(stack[pick].sum(axis=0), background_index)
        for name in SUMMARY_METRICS:
            draws[name].append(values[name])
    tail = (1 - confidence) / 2 * 100
    intervals = {}
    for name, values in draws.items():
        finite = np.asarray(values)[~np.isnan(values)]
        if finite.size:
            intervals[name] = [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]
    return intervals


class MetricAccumulator:
    """Sums confusion matrices over a data set (optionally keeping one per image for bootstrap)."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255, class_names: list[str] | None = None,
                 background_index: int | None = 0, keep_per_image: bool = False) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.background_index = background_index
        self.keep_per_image = keep_per_image
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.per_image: list[np.ndarray] = []

    def update(self, pred: Any, target: Any) -> np.ndarray:
        """Add one image (or batch) of labels; returns its confusion matrix."""
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.matrix += cm
        if self.keep_per_image:
            self.per_image.append(cm)
        return cm

    def compute(self, bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
        """Summary and per-class metrics; with `bootstrap` > 0 adds 95% intervals under "ci95"."""
        result = metrics_from_confusion(self.matrix, self.background_index)
        result["class_names"] = self.class_names
        result["confusion_matrix"] = self.matrix.tolist()
        if bootstrap > 0 and self.per_image:
            result["ci95"] = bootstrap_intervals(self.per_image, bootstrap, 0.95, seed, self.background_index)
        return result


def format_metrics(metrics: dict[str, Any], names: tuple[str, ...] = ("mdice", "dice_no_bg", "miou", "pixel_acc")) -> str:
    """A short one-line summary such as 'mdice 0.812 dice_no_bg 0.701 ...'."""
    return " ".join(f"{name} {metrics[name]:.4f}" for name in names if name in metrics)
