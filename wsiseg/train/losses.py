"""Segmentation losses, all honouring the ignore index, and their weighted sum from the YAML.

`training.loss` maps loss names to weights, e.g. `{cross_entropy: 1.0, dice: 1.0}`, plus the
options focal_gamma, ohem_fraction, ohem_threshold, class_weights and smooth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from wsiseg.config import defaults
from wsiseg.errors import WsisegError
from wsiseg.train.choices import LOSSES

Weights = torch.Tensor | None
# a loss in the weighted sum: (logits, target, ignore_index, options, class_weights) -> scalar
Term = Callable[[torch.Tensor, torch.Tensor, int, dict[str, Any], Weights], torch.Tensor]


def _valid_one_hot(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax probabilities, one-hot target and the valid-pixel mask (B, 1, H, W); ignored pixels count for nothing."""
    probabilities = logits.float().softmax(dim=1)
    valid = (target != ignore_index)
    safe = torch.where(valid, target, torch.zeros_like(target))
    one_hot = F.one_hot(safe, logits.shape[1]).permute(0, 3, 1, 2).float()
    valid = valid[:, None].float()
    return probabilities * valid, one_hot * valid, valid


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                  class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-mean cross-entropy over non-ignored pixels (0 when every pixel is ignored)."""
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, weight=class_weights, ignore_index=ignore_index)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, averaged over the classes present in the batch's labels."""
    probabilities, one_hot, _ = _valid_one_hot(logits, target, ignore_index)
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    denominator = probabilities.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    present = one_hot.sum(dims) > 0
    if not present.any():
        return logits.sum() * 0.0
    return 1 - dice[present].mean()


def iou_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Jaccard index, averaged over the classes present in the batch's labels."""
    probabilities, one_hot, _ = _valid_one_hot(logits, target, ignore_index)
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    union = probabilities.sum(dims) + one_hot.sum(dims) - intersection
    iou = (intersection + smooth) / (union + smooth)
    present = one_hot.sum(dims) > 0
    if not present.any():
        return logits.sum() * 0.0
    return 1 - iou[present].mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, gamma: float = 2.0,
               class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy down-weighted by (1 - p_true)^gamma, mean over non-ignored pixels."""
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    per_pixel = F.cross_entropy(logits.float(), target, weight=class_weights, ignore_index=ignore_index, reduction="none")
    p_true = torch.exp(-F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none"))
    return ((1 - p_true) ** gamma * per_pixel)[valid].mean()


def ohem_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, threshold: float = 0.7,
              fraction: float = 0.25, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Online hard example mining: cross-entropy over pixels whose true-class probability is below
    `threshold`, and at least the hardest `fraction` of the valid pixels."""
    valid = target != ignore_index
    count = int(valid.sum())
    if count == 0:
        return logits.sum() * 0.0
    per_pixel = F.cross_entropy(logits.float(), target, weight=class_weights, ignore_index=ignore_index,
                                reduction="none")[valid]
    keep_min = max(1, int(count * fraction))
    hard = per_pixel > -torch.log(torch.tensor(threshold, device=per_pixel.device))
    if int(hard.sum()) < keep_min:
        return per_pixel.topk(keep_min).values.mean()
    return per_pixel[hard].mean()


def cross_entropy_term(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, options: dict[str, Any],
                       class_weights: Weights) -> torch.Tensor:
    """`cross_entropy` in a weighted sum (class_weights apply)."""
    return cross_entropy(logits, target, ignore_index, class_weights)


def dice_term(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, options: dict[str, Any],
              class_weights: Weights) -> torch.Tensor:
    """`dice` in a weighted sum (options: smooth)."""
    return dice_loss(logits, target, ignore_index, float(options["smooth"]))


def iou_term(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, options: dict[str, Any],
             class_weights: Weights) -> torch.Tensor:
    """`iou` in a weighted sum (options: smooth)."""
    return iou_loss(logits, target, ignore_index, float(options["smooth"]))


def focal_term(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, options: dict[str, Any],
               class_weights: Weights) -> torch.Tensor:
    """`focal` in a weighted sum (options: focal_gamma; class_weights apply)."""
    return focal_loss(logits, target, ignore_index, float(options["focal_gamma"]), class_weights)


def ohem_term(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, options: dict[str, Any],
              class_weights: Weights) -> torch.Tensor:
    """`ohem` in a weighted sum (options: ohem_threshold, ohem_fraction; class_weights apply)."""
    return ohem_loss(logits, target, ignore_index, float(options["ohem_threshold"]), float(options["ohem_fraction"]),
                     class_weights)


class CombinedLoss:
    """The weighted sum of named losses; `.last` holds each term's value of the latest call."""

    def __init__(self, loss_cfg: dict[str, Any], num_classes: int, ignore_index: int = 255) -> None:
        self.weights = {name: float(loss_cfg[name]) for name in LOSSES if float(loss_cfg.get(name, 0) or 0) > 0}
        if not self.weights:
            raise WsisegError("training.loss has no loss with a weight > 0; e.g. {cross_entropy: 1.0, dice: 1.0}")
        self.ignore_index = ignore_index
        self.options = {**defaults("training.loss"), **{k: v for k, v in loss_cfg.items() if v is not None}}
        weights = loss_cfg.get("class_weights")
        if weights is not None and len(weights) != num_classes:
            raise WsisegError(f"training.loss.class_weights has {len(weights)} values for {num_classes} classes; "
                              "give one per class")
        self.class_weights = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
        self.terms: dict[str, Term] = {name: LOSSES.load(name) for name in self.weights}
        self.last: dict[str, float] = {}

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weights = self.class_weights.to(logits.device) if self.class_weights is not None else None
        total = logits.new_zeros((), dtype=torch.float32)
        self.last = {}
        for name, weight in self.weights.items():
            value = self.terms[name](logits, target, self.ignore_index, self.options, weights)
            self.last[name] = float(value.detach())
            total = total + weight * value
        return total
