"""The config's sections as typed dataclasses: every key with its type, default and bounds, once.

`wsiseg.config` derives its validation table from these classes (`schema`), fills a YAML
mapping's missing keys from their defaults and checks everything at once; `Config.from_dict`
gives the completed config as typed objects. The completed config itself stays a plain dict
of plain values, because it is written as YAML and stored inside checkpoints (which load with
`weights_only`).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any

from wsiseg.engine.choices import BLENDS, PREDICTION_MODES
from wsiseg.metrics import SUMMARY_METRICS
from wsiseg.models.choices import DECODERS, FINETUNE_MODES
from wsiseg.train.choices import OPTIMIZERS, SCHEDULERS

REQUIRED = object()
AUGMENTATIONS = (
    "random_resized_crop", "hflip", "vflip", "rotate90", "transpose", "elastic", "grid_distortion",
    "optical_distortion", "color_jitter", "hsv", "rgb_shift", "gaussian_noise", "multiplicative_noise",
    "gaussian_blur", "motion_blur", "median_blur", "brightness_contrast", "gamma", "coarse_dropout",
)
PROB = {"minimum": 0.0, "maximum": 1.0}


@dataclass(frozen=True)
class Key:
    """One config key as the validator sees it: default, accepted types, and optional choices / bounds."""

    default: Any
    types: tuple[type, ...]
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    nullable: bool = False
    help: str = ""


def key(default: Any = MISSING, *, choices: tuple[Any, ...] | None = None, minimum: float | None = None,
        maximum: float | None = None, help: str = "") -> Any:
    """A dataclass field with the validator's facts in its metadata (no default = required)."""
    metadata = {"choices": choices, "minimum": minimum, "maximum": maximum, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DatasetConfig:
    json: str = key(help="the dataset JSON (train/val/test lists), or sample:hgsc_nest")
    num_classes: int | None = key(None, minimum=1)
    class_names: list[str] | None = None
    ignore_index: int = key(255, minimum=0)
    mpp: float = key(0.5, minimum=0.01, help="resolution of the patches = segmentation MPP for slides")


@dataclass
class SystemConfig:
    device: str = "auto"
    num_workers: int = key(2, minimum=0)
    seed: int = key(42, minimum=0)
    precision: str = key("auto", choices=("auto", "bf16", "fp16", "fp32"))
    deterministic: bool = False
    pin_memory: bool | None = key(None, help="pin host memory of the training loader on CUDA (never on CPU); null = true")


@dataclass
class ModelConfig:
    name: str = key(help="a registry name or timm:<name>")
    pfm_weights_path: str | None = None
    emb_dim: int | None = key(None, minimum=1, help="checked against the model")
    decoder: str = key("fused", choices=DECODERS.names)
    finetune_mode: str = key("lora", choices=FINETUNE_MODES.names)
    lora_r: int = key(8, minimum=1)
    lora_alpha: float = key(16.0, minimum=0, help="peft scaling: the update is scaled by lora_alpha / lora_r")
    lora_dropout: float = key(0.0, **PROB)
    lora_target_modules: list[str] = key(["qkv", "proj"])
    input_size: int = key(224, minimum=8, help="window side: a multiple of the patch size")
    num_classes: int | None = key(None, minimum=1)
    merged_from: str | None = key(None, help="set by `merge` exports: the fine-tuning mode merged into the weights")


@dataclass
class TrainingConfig:
    epochs: int = key(20, minimum=1)
    batch_size: int = key(8, minimum=1)
    optimizer: str = key("adamw", choices=OPTIMIZERS.names)
    lr: float = key(1e-4, minimum=0)
    backbone_lr: float | None = key(None, minimum=0, help="learning rate of the backbone; null = lr")
    weight_decay: float = key(0.01, minimum=0)
    momentum: float = key(0.9, **PROB)
    nesterov: bool = key(True, help="Nesterov momentum (SGD)")
    scheduler: str = key("cosine", choices=SCHEDULERS.names)
    warmup_epochs: float = key(1.0, minimum=0)
    min_lr_ratio: float = key(0.01, **PROB)
    step_epochs: int = key(10, minimum=1)
    step_gamma: float = key(0.1, minimum=0)
    poly_power: float = key(0.9, minimum=0)
    loss: dict[str, Any] = key({"cross_entropy": 1.0}, help="loss name -> weight, plus the LossOptions")
    augmentations: dict[str, float] = key({"random_resized_crop": 1.0, "hflip": 0.5, "vflip": 0.5, "rotate90": 0.5,
                                           "color_jitter": 0.5})
    grad_accum: int = key(1, minimum=1)
    clip_grad: float = key(1.0, minimum=0)
    crop_size: int | None = key(None, minimum=8, help="training crop side; null = model.input_size")
    repeats: int = key(1, minimum=1, help="passes over the training list per epoch")


@dataclass
class LossOptions:
    focal_gamma: float = key(2.0, minimum=0)
    ohem_fraction: float = key(0.25, **PROB)
    ohem_threshold: float = key(0.7, **PROB)
    class_weights: list[float] | None = None
    smooth: float = key(1.0, minimum=0)


@dataclass
class ValidationConfig:
    every: int = key(1, minimum=1)
    metric: str = key("mdice", choices=tuple(SUMMARY_METRICS))
    batch_size: int = key(8, minimum=1)
    mode: str = key("windowslide", choices=PREDICTION_MODES.names)
    overlap: float = key(0.25, minimum=0.0, maximum=0.9)
    blend: str = key("gaussian", choices=BLENDS.names)


@dataclass
class LoggingConfig:
    output_dir: str = "runs/experiment"
    log_every: int = key(10, minimum=1)


@dataclass
class VisualizationConfig:
    num_samples: int = key(4, minimum=0)
    every: int = key(1, minimum=1, help="save sample panels at every Nth epoch (of those validated)")
    alpha: float = key(0.5, **PROB)


SECTIONS: dict[str, type] = {
    "dataset": DatasetConfig, "system": SystemConfig, "model": ModelConfig, "training": TrainingConfig,
    "validation": ValidationConfig, "logging": LoggingConfig, "visualization": VisualizationConfig,
}


@dataclass
class Config:
    """A completed config as typed sections (`Config.from_dict(load_config(path))`)."""

    dataset: DatasetConfig
    system: SystemConfig
    model: ModelConfig
    training: TrainingConfig
    validation: ValidationConfig
    logging: LoggingConfig
    visualization: VisualizationConfig

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> Config:
        """Typed sections of a completed config dict (as `wsiseg.config.load_config` returns it)."""
        return cls(**{name: section(**config[name]) for name, section in SECTIONS.items()})

    def to_dict(self) -> dict[str, Any]:
        """The plain dict form (YAML and checkpoints)."""
        return dataclasses.asdict(self)


_ACCEPTED: dict[Any, tuple[type, ...]] = {int: (int,), float: (float, int), str: (str,), bool: (bool,),
                                          list: (list,), dict: (dict,)}


def _accepted(annotation: Any) -> tuple[tuple[type, ...], bool]:
    """(accepted Python types, nullable) of a field annotation such as `float | None` or `list[str]`."""
    parts = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    nullable = type(None) in parts
    accepted: tuple[type, ...] = ()
    for part in parts:
        if part is not type(None):
            accepted += _ACCEPTED[typing.get_origin(part) or part]
    return accepted, nullable


def schema(section: type) -> dict[str, Key]:
    """The validator's table of a section dataclass: name -> Key (REQUIRED where there is no default)."""
    hints = typing.get_type_hints(section)
    out = {}
    for item in dataclasses.fields(section):
        if item.default is not MISSING:
            default = item.default
        elif item.default_factory is not MISSING:
            default = item.default_factory()
        else:
            default = REQUIRED
        accepted, nullable = _accepted(hints[item.name])
        meta = item.metadata
        out[item.name] = Key(default, accepted, meta.get("choices"), meta.get("minimum"), meta.get("maximum"),
                             nullable, meta.get("help", ""))
    return out


SCHEMA: dict[str, dict[str, Key]] = {name: schema(section) for name, section in SECTIONS.items()}
LOSS_OPTIONS: dict[str, Key] = schema(LossOptions)
