"""The reference project's YAML dialect, read onto wsiseg's native config before validation.

`TABLE` is the whole mapping: each row names a reference key, the native key(s) it becomes and
how its value changes meaning. `normalise(raw)` applies it to a raw YAML mapping and returns the
native mapping, one note per reference key read ("training.learning_rate 0.001 -> training.lr
0.001") and the problems found; `wsiseg.config.validate_config` then checks the result with the
one native validator. Native keys pass through untouched, so a file may mix both dialects as
long as no setting is given twice. `migrate_config` writes the native equivalent of a file.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg.choices import either
from wsiseg.config_types import LOSS_OPTIONS, SCHEMA
from wsiseg.models.choices import FINETUNE_MODES
from wsiseg.train.choices import LOSSES, OPTIMIZERS, SCHEDULERS

UNSUPPORTED_MODES = ("cnn_adapter", "transformer_adapter")
Lookup = Callable[[str], Any]


class _Bad(Exception):
    """A reference value that cannot be read (its message becomes one problem)."""


@dataclass(frozen=True)
class Row:
    """One reference key: where it goes natively, and how its value is read (`convert`)."""

    reference: str
    native: tuple[str, ...]
    meaning: str = ""
    convert: Callable[[Any, Lookup], tuple[Any, ...]] | None = None
    defaults_only: tuple[str, ...] = ()  # native keys set only when nothing else sets them


def _number(path: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise _Bad(f"{path} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _word(path: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{path} must be one of {', '.join(choices)}, got {value!r}")
    lowered = value.lower()
    if lowered in UNSUPPORTED_MODES:
        raise _Bad(f"{path} is '{value}': the reference's adapter modes ({', '.join(UNSUPPORTED_MODES)}) are not "
                   f"implemented in wsiseg; use {either(choices)}")
    if lowered not in choices:
        close = difflib.get_close_matches(lowered, choices, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise _Bad(f"{path} is {value!r}; choose one of {', '.join(choices)}{hint}")
    return lowered


def model_name(value: Any) -> str:
    """A reference `pfm_name` as a registry name: case, '-' and '_' do not matter (PathOrchestra, H-optimus-0)."""
    from wsiseg.models.registry import names

    if not isinstance(value, str):
        raise _Bad(f"model.pfm_name must be a model name, got {value!r}")
    if value in names() or value.startswith("timm:"):
        return value
    squash = lambda text: "".join(c for c in text.lower() if c.isalnum())  # noqa: E731
    matches = [name for name in names() if squash(name) == squash(value)]
    return matches[0] if len(matches) == 1 else value


def _rank(lookup: Lookup) -> int:

    rank = lookup("model.finetune_mode.rank")
    if rank is None:
        rank = lookup("model.lora_r")
    return rank if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 else SCHEMA["model"]["lora_r"].default


def _output_dir(value: Any, lookup: Lookup) -> tuple[str]:
    log_dir, name = lookup("logging.log_dir"), lookup("logging.experiment_name")
    for path, part in (("logging.log_dir", log_dir), ("logging.experiment_name", name)):
        if part is not None and not isinstance(part, (str, int)):
            raise _Bad(f"{path} must be a folder name, got {part!r}")
    return (str(Path(str(log_dir if log_dir is not None else "logs")) / str(name if name is not None else "experiment")),)


def _same(value: Any, lookup: Lookup) -> tuple[Any]:
    return (value,)


def _lr(value: Any, lookup: Lookup) -> tuple[float]:
    return (_number("training.learning_rate", value),)


def _mode(value: Any, lookup: Lookup) -> tuple[str]:
    return (_word("model.finetune_mode.type", value, FINETUNE_MODES.names),)


def _alpha(value: Any, lookup: Lookup) -> tuple[float]:
    return (_number("model.finetune_mode.alpha", value) * _rank(lookup),)


def _optimizer(value: Any, lookup: Lookup) -> tuple[str]:
    return (_word("training.optimizer.type", value, OPTIMIZERS.names),)


def _scheduler(value: Any, lookup: Lookup) -> tuple[str]:
    return (_word("training.scheduler.type", value, SCHEDULERS.names),)


def _loss(value: Any, lookup: Lookup) -> tuple[dict[str, Any]]:

    name = _word("training.loss.type", value, LOSSES.names)
    options = {k: v for k, v in (lookup("training.loss") or {}).items() if k in LOSS_OPTIONS}
    return ({name: 1.0, **options},)


def _amp(value: Any, lookup: Lookup) -> tuple[str]:
    if not isinstance(value, bool):
        raise _Bad(f"training.use_amp must be true or false, got {value!r}")
    return ("auto" if value else "fp32",)


def _clip(value: Any, lookup: Lookup) -> tuple[float]:
    return (0.0 if value is None else _number("training.clip_grad_norm", value),)


def _resized(value: Any, lookup: Lookup) -> tuple[Any, str]:
    return (value, "resize")


def _crop(value: Any, lookup: Lookup) -> tuple[Any, Any]:
    return (value, value)


def _pfm(value: Any, lookup: Lookup) -> tuple[str]:
    return (model_name(value),)


TABLE: tuple[Row, ...] = (
    Row("dataset.json_file", ("dataset.json",)),
    Row("model.pfm_name", ("model.name",), "registry spelling: case, '-' and '_' do not matter (PathOrchestra "
        "-> pathorchestra)", _pfm),
    Row("model.finetune_mode.type", ("model.finetune_mode",), f"{either(FINETUNE_MODES)} in any case; "
        f"{either(UNSUPPORTED_MODES)} are refused", _mode),
    Row("model.finetune_mode.rank", ("model.lora_r",)),
    Row("model.finetune_mode.alpha", ("model.lora_alpha",), "the reference scales the LoRA update by alpha itself; "
        "peft scales by lora_alpha / r, so lora_alpha = alpha * rank", _alpha),
    Row("training.learning_rate", ("training.lr",), "", _lr),
    Row("training.optimizer.type", ("training.optimizer",), "SGD, Adam or AdamW in any case", _optimizer),
    Row("training.optimizer.momentum", ("training.momentum",)),
    Row("training.optimizer.nesterov", ("training.nesterov",)),
    Row("training.optimizer.weight_decay", ("training.weight_decay",)),
    Row("training.scheduler.type", ("training.scheduler",), "cosine or step (linear warmup first)", _scheduler),
    Row("training.scheduler.warmup_epochs", ("training.warmup_epochs",)),
    Row("training.loss.type", ("training.loss",), "one loss with weight 1", _loss),
    Row("training.use_amp", ("system.precision",), "true = auto (bf16, or fp16 without bf16, on CUDA; fp32 on "
        "CPU), false = fp32", _amp),
    Row("training.accumulate_grad_batches", ("training.grad_accum",)),
    Row("training.clip_grad_norm", ("training.clip_grad",), "null = no clipping (0)", _clip),
    Row("training.augmentation.RandomResizedCropSize", ("training.crop_size", "model.input_size"),
        "the training crop; also the validation/inference window when ResizedSize is absent", _crop,
        ("model.input_size",)),
    Row("validation.augmentation.ResizedSize", ("model.input_size", "validation.mode"),
        "validation images are resized to this size (longer side, aspect ratio kept)", _resized,
        ("validation.mode",)),
    Row("validation.eval_interval", ("validation.every",)),
    Row("logging.log_dir", ("logging.output_dir",), "outputs go to log_dir/experiment_name", _output_dir),
    Row("logging.experiment_name", ("logging.output_dir",), "outputs go to log_dir/experiment_name", _output_dir),
    Row("visualization.save_interval", ("visualization.every",)),
    Row("visualization.num_vis_samples", ("visualization.num_samples",)),
)

# mappings the reference nests where wsiseg has flat keys: read only when they are mappings
CONTAINERS = ("model.finetune_mode", "training.optimizer", "training.scheduler", "training.augmentation",
              "validation.augmentation")


def reference_keys() -> dict[str, list[str]]:
    """Section -> the reference's key names there (for "did you mean" and "belongs in section")."""
    out: dict[str, list[str]] = {}
    for row in TABLE:
        section, key = row.reference.split(".")[:2]
        if key not in out.setdefault(section, []):
            out[section].append(key)
    return out


def nested_home(key: str) -> str | None:
    """The nested mapping a reference key belongs in ('training.augmentation' for RandomResizedCropSize),
    None when it has none or several (`type`)."""
    homes = {parent for parent, leaf in (row.reference.rsplit(".", 1) for row in TABLE)
             if leaf == key and parent.count(".") == 1}
    return next(iter(homes)) if len(homes) == 1 else None


def get_path(mapping: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping


def _has(mapping: Any, path: str) -> bool:
    *parents, last = path.split(".")
    for part in parents:
        if not isinstance(mapping, dict) or not isinstance(mapping.get(part), dict):
            return False
        mapping = mapping[part]
    return isinstance(mapping, dict) and last in mapping


@dataclass
class Normalised:
    """The native mapping, what each reference key was read as, the problems, and native -> reference names."""

    raw: dict[str, Any]
    notes: list[str]
    problems: list[str]
    aliases: dict[str, str]
    unreadable: set[str]


def set_path(native: dict[str, Any], path: str, value: Any) -> None:
    section, key = path.split(".")
    if not isinstance(native.get(section), dict):
        native[section] = {}
    native[section][key] = value


def _pop(native: dict[str, Any], path: str) -> None:
    *parents, last = path.split(".")
    mapping = native
    for part in parents:
        mapping = mapping[part]
    del mapping[last]


def _is_reference_loss(raw: dict[str, Any]) -> bool:
    loss = get_path(raw, "training.loss")
    return isinstance(loss, dict) and "type" in loss


def _strip(raw: dict[str, Any], present: list[Row], problems: list[str]) -> dict[str, Any]:
    """A copy of `raw` without its reference keys and containers; unknown container keys become problems."""

    native = copy.deepcopy(raw)
    for row in present:
        if _has(native, row.reference) and row.reference.count(".") == 1:
            _pop(native, row.reference)
    for container in CONTAINERS:
        value = get_path(raw, container)
        if value is None and _has(native, container):
            _pop(native, container)  # an empty mapping in the YAML
        if not isinstance(value, dict):
            continue
        known = [row.reference.rsplit(".", 1)[1] for row in TABLE if row.reference.startswith(container + ".")]
        for key in value:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; its keys: {', '.join(known)}"
                problems.append(f"unknown key '{container}.{key}'{hint}")
        _pop(native, container)
    if _is_reference_loss(raw):
        for key in raw["training"]["loss"]:
            if key != "type" and key not in LOSS_OPTIONS:
                close = difflib.get_close_matches(str(key), ["type", *LOSS_OPTIONS], n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else f"; losses: {', '.join(LOSSES)}"
                problems.append(f"unknown key 'training.loss.{key}'{hint}")
        _pop(native, "training.loss")
    for key in UNSUPPORTED_MODES:
        if _has(native, f"model.{key}"):
            problems.append(f"model.{key} configures the reference's {key} mode, which wsiseg does not "
                            f"implement; remove it and use model.finetune_mode {either(FINETUNE_MODES)}")
            _pop(native, f"model.{key}")
    return native


def normalise(raw: dict[str, Any]) -> Normalised:
    """Read the reference keys of a raw config mapping as native ones (see the module docstring)."""
    problems: list[str] = []
    aliases: dict[str, str] = {}
    lookup: Lookup = lambda path: get_path(raw, path)  # noqa: E731
    present = [row for row in TABLE if _has(raw, row.reference)]
    native = _strip(raw, present, problems)
    given_natively = {f"{s}.{k}" for s, keys in native.items() if isinstance(keys, dict) for k in keys}
    converted: dict[Row, tuple[Any, ...]] = {}
    unreadable: set[str] = set()
    for row in present:
        try:
            converted[row] = (row.convert or _same)(lookup(row.reference), lookup)
        except _Bad as bad:
            problems.append(str(bad))
            unreadable.update(row.native)
    written: dict[str, str] = {}
    shown: dict[Row, list[str]] = {row: [] for row in converted}
    for soft_pass in (False, True):
        for row, values in converted.items():
            for path, value in zip(row.native, values):
                if (path in row.defaults_only) != soft_pass:
                    continue
                if path in given_natively or (soft_pass and path in written):
                    if not soft_pass and get_path(native, path) != value:
                        problems.append(f"{row.reference} (reference) and {path} (native) set the same thing; keep one")
                    continue
                if path in written and path != "logging.output_dir":
                    problems.append(f"{row.reference} and {written[path]} both set {path}; keep one")
                    continue
                set_path(native, path, value)
                written.setdefault(path, row.reference)
                aliases.setdefault(path, row.reference)
                shown[row].append(f"{path} {value!r}")
    notes = [f"{row.reference} {lookup(row.reference)!r} -> {', '.join(parts)}" for row, parts in shown.items() if parts]
    return Normalised(native, notes, problems, aliases, unreadable)


def drop_counterparts(raw: dict[str, Any], path: str) -> None:
    """Remove what sets the same thing as `path` in the other dialect (an override replaces both forms)."""
    for row in TABLE:
        hard = [native for native in row.native if native not in row.defaults_only]
        if path in hard and _has(raw, row.reference) and not row.reference.startswith(path + "."):
            _pop(raw, row.reference)
        elif path == row.reference:
            for native in hard:
                if _has(raw, native) and not isinstance(get_path(raw, native), dict):
                    _pop(raw, native)
