"""Training's named choices, registered once and torch-free (config validation reads them).

Losses are summed in registration order, so the order here is part of the numbers a run gives.
"""

from __future__ import annotations

from wsiseg.choices import Choices

# loss -> term(logits, target, ignore_index, options, class_weights) -> scalar tensor
LOSSES = Choices("loss", {
    "cross_entropy": "wsiseg.train.losses:cross_entropy_term",
    "dice": "wsiseg.train.losses:dice_term",
    "iou": "wsiseg.train.losses:iou_term",
    "ohem": "wsiseg.train.losses:ohem_term",
    "focal": "wsiseg.train.losses:focal_term",
})

# optimiser -> build(parameter groups, TrainingConfig) -> torch.optim.Optimizer
OPTIMIZERS = Choices("training.optimizer", {
    "sgd": "wsiseg.train.optim:sgd",
    "adam": "wsiseg.train.optim:adam",
    "adamw": "wsiseg.train.optim:adamw",
})

# scheduler -> factor(step, progress after warmup, TrainingConfig, steps per epoch) -> learning-rate multiplier
SCHEDULERS = Choices("training.scheduler", {
    "cosine": "wsiseg.train.optim:cosine",
    "step": "wsiseg.train.optim:step_decay",
    "poly": "wsiseg.train.optim:poly",
    "none": "wsiseg.train.optim:constant",
})
