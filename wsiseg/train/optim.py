"""Optimisers and learning-rate schedules by name (`training.optimizer`, `training.scheduler`).

The names are registered in `wsiseg.train.choices`; every schedule starts with a linear warmup.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from wsiseg.config_types import TrainingConfig
from wsiseg.train.choices import OPTIMIZERS, SCHEDULERS

Groups = list[dict[str, Any]]


def build_optimizer(groups: Groups, training: TrainingConfig) -> torch.optim.Optimizer:
    """The optimiser named by training.optimizer over the parameter groups."""
    return OPTIMIZERS.load(training.optimizer)(groups, training)


def sgd(groups: Groups, training: TrainingConfig) -> torch.optim.Optimizer:
    """SGD with momentum, Nesterov unless training.nesterov is false (or there is no momentum)."""
    return torch.optim.SGD(groups, lr=training.lr, momentum=training.momentum,
                           nesterov=training.nesterov and training.momentum > 0)


def adam(groups: Groups, training: TrainingConfig) -> torch.optim.Optimizer:
    """Adam (weight decay per group, as L2 in the gradient)."""
    return torch.optim.Adam(groups, lr=training.lr)


def adamw(groups: Groups, training: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay per group)."""
    return torch.optim.AdamW(groups, lr=training.lr)


def lr_factor(step: int, training: TrainingConfig, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimiser step `step`: linear warmup, then training.scheduler's schedule."""
    total = max(1, training.epochs * steps_per_epoch)
    warmup = min(int(round(training.warmup_epochs * steps_per_epoch)), total - 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return SCHEDULERS.load(training.scheduler)(step, progress, training, steps_per_epoch)


def cosine(step: int, progress: float, training: TrainingConfig, steps_per_epoch: int) -> float:
    """Half a cosine from 1 down to training.min_lr_ratio."""
    floor = training.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def poly(step: int, progress: float, training: TrainingConfig, steps_per_epoch: int) -> float:
    """(1 - progress) ** training.poly_power, from 1 down to training.min_lr_ratio."""
    floor = training.min_lr_ratio
    return floor + (1 - floor) * (1 - progress) ** training.poly_power


def step_decay(step: int, progress: float, training: TrainingConfig, steps_per_epoch: int) -> float:
    """Multiplied by training.step_gamma every training.step_epochs epochs."""
    return training.step_gamma ** ((step // steps_per_epoch) // training.step_epochs)


def constant(step: int, progress: float, training: TrainingConfig, steps_per_epoch: int) -> float:
    """No schedule after the warmup: 1."""
    return 1.0
