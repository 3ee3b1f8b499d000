"""Segmenter checkpoints: one file with decoder, adapter (or backbone) weights, config and class names.

What is stored of the backbone depends on how it was trained:
- `lora` / `dora` on PFM weights: only the adapter (LoRA A/B, DoRA magnitudes); loading
  rebuilds the backbone from the user's PFM weights (`model.pfm_weights_path`).
- `frozen` on PFM weights: nothing; the backbone is rebuilt from the PFM weights.
- `full`, merged exports, and any backbone that started from random weights: the whole
  backbone, so the file alone reproduces the model.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from wsiseg.errors import WsisegError
from wsiseg.models.finetune import adapter_state, is_peft, load_adapter_state, merge
from wsiseg.models.registry import entry
from wsiseg.models.segmenter import Segmenter, build_segmenter, model_config
from wsiseg.outputs import atomic_file, check_writable, remove_dead_temporaries
from wsiseg.progress import get_logger

log = get_logger("models.checkpoint")

FORMAT = "wsiseg-segmenter"
VERSION = 1


def _random_base(config: dict[str, Any]) -> bool:
    """Whether the backbone started from random weights (no PFM weights and no default weights)."""
    model = config.get("model", {})
    return model.get("pfm_weights_path") is None and entry(model["name"]).default_weights is None


def _backbone_payload(model: Segmenter, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """("adapter" | "full" | "none", tensors) for the backbone of `model`."""
    if model.finetune_mode == "full" or _random_base(config) or config["model"].get("merged_from"):
        return "full", model.backbone.state_dict()
    if is_peft(model.backbone):
        return "adapter", adapter_state(model.backbone)
    return "none", {}


def save_checkpoint(path: str | Path, model: Segmenter, config: dict[str, Any], class_names: list[str],
                    **extra: Any) -> Path:
    """Write a checkpoint atomically (temporary file renamed into place); `extra` is stored as is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind, backbone = _backbone_payload(model, config)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": copy.deepcopy(config),
        "class_names": list(class_names),
        "num_classes": model.num_classes,
        "backbone_state": kind,
        "backbone_options": dict(model.backbone_options),
        "backbone": {k: v.detach().cpu() for k, v in backbone.items()},
        "decoder": {k: v.detach().cpu() for k, v in model.decoder.state_dict().items()},
        "extra": extra,
    }
    for stale in remove_dead_temporaries(path):
        log.info("removed %s, left by a killed save", stale.name)
    with atomic_file(path) as partial, open(partial, "wb") as handle:
        try:
            torch.save(payload, handle)  # through a Python file: a full disk is an OSError, not torch's RuntimeError
        except RuntimeError as error:  # a write failing part-way: torch's zip writer raises its own error over it
            if isinstance(error.__context__, OSError):
                raise error.__context__ from None
            raise
        handle.flush()
        os.fsync(handle.fileno())
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file written by `save_checkpoint`: its payload, plus `path` (where it was read from)."""
    path = Path(path)
    if not path.is_file():
        raise WsisegError(f"checkpoint not found: {path}; pass the .pth written by `wsiseg train` (checkpoints/best_model.pth)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means a corrupt or foreign file
        raise WsisegError(f"cannot read checkpoint {path}: {type(error).__name__}; the file is corrupt or not a wsiseg checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WsisegError(f"{path} is not a wsiseg segmenter checkpoint; pass a checkpoint written by `wsiseg train`")
    payload["path"] = str(path)
    return payload


# what defines the model a checkpoint holds: a config given with the checkpoint must agree on each it states
MODEL_KEYS = (("model", "name"), ("dataset", "num_classes"), ("model", "finetune_mode"), ("model", "decoder"))


def _trained_with(payload: dict[str, Any], section: str, key: str) -> set[Any]:
    """The values of `section.key` the checkpoint accepts (a merged export: also the mode it was merged from)."""
    if (section, key) == ("dataset", "num_classes"):
        return {len(payload["class_names"])}
    if (section, key) == ("model", "name"):
        return {payload["config"]["model"]["name"]}
    model = model_config(payload["config"]["model"])
    values = {model[key]}
    if key == "finetune_mode" and model.get("merged_from"):
        values.add(model["merged_from"])
    return values


def reconcile(payload: dict[str, Any], config: dict[str, Any] | str | Path | None) -> dict[str, Any]:
    """The config the model of a checkpoint is rebuilt from: the one rule for load, merge, infer, segment and resume.

    The checkpoint is the truth about the model: its stored config is used, with only
    `model.pfm_weights_path` taken from `config` (the user's copy of the PFM weights). Each of
    MODEL_KEYS that `config` states must agree with the checkpoint (defaults filled in).
    """
    stored = copy.deepcopy(payload["config"])
    if config is None:
        return stored
    if not isinstance(config, dict):
        from wsiseg.config import load_config

        config = load_config(config, splits=(), check_files=False)
    for section, key in MODEL_KEYS:
        ours = (config.get(section) or {}).get(key)
        theirs = _trained_with(payload, section, key)
        if ours is not None and ours not in theirs:
            shown = " or ".join(map(repr, sorted(theirs)))
            classes = f" (its classes: {', '.join(payload['class_names'])})" if key == "num_classes" else ""
            raise WsisegError(f"checkpoint {payload['path']} was trained with {section}.{key} = {shown} but the config has "
                              f"{ours!r}{classes}; use the matching config or checkpoint")
    user_model = config.get("model") or {}
    if "pfm_weights_path" in user_model:
        stored["model"]["pfm_weights_path"] = user_model["pfm_weights_path"]
    return stored


def restore_weights(model: Segmenter, payload: dict[str, Any], assign: bool = False) -> None:
    """Load the backbone (whole or adapter) and decoder weights of a checkpoint into `model` (load and resume).

    `assign` puts the stored tensors in place of a backbone built on the meta device.
    """
    kind = payload["backbone_state"]
    if kind == "full":
        model.backbone.load_state_dict(payload["backbone"], strict=True, assign=assign)
    elif kind == "adapter":
        load_adapter_state(model.backbone, payload["backbone"])
    model.decoder.load_state_dict(payload["decoder"], strict=True)


def segmenter_from(payload: dict[str, Any], config: dict[str, Any], device: str = "cpu") -> Segmenter:
    """The segmenter of a checkpoint already read, rebuilt from `config` (see `reconcile`), in eval mode on `device`."""
    cfg = model_config(config["model"])
    whole = payload["backbone_state"] == "full" and cfg["finetune_mode"] in ("full", "frozen")
    model = build_segmenter(cfg, payload["num_classes"], load_weights=not whole, **payload.get("backbone_options", {}))
    restore_weights(model, payload, assign=whole)
    model.class_names = list(payload["class_names"])
    return model.to(torch.device(device)).eval()


def load_segmenter(config: dict[str, Any] | str | Path | None, checkpoint: str | Path | dict[str, Any],
                   device: str = "cpu") -> Segmenter:
    """Rebuild the segmenter of a checkpoint (a path, or a payload `read_checkpoint` returned) in eval mode on
    `device`, checked against `config` (None: the stored one)."""
    payload = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    return segmenter_from(payload, reconcile(payload, config), device)


def merge_checkpoint(checkpoint: str | Path, out: str | Path, config: dict[str, Any] | str | Path | None = None,
                     overwrite: bool = False) -> Path:
    """Export a checkpoint as a plain model: LoRA/DoRA folded into the weights, whole backbone stored."""
    out = Path(out)
    check_writable(out, overwrite)
    payload = read_checkpoint(checkpoint)
    stored = reconcile(payload, config)
    model = segmenter_from(payload, stored, "cpu")
    model.backbone = merge(model.backbone)
    # the mode the model was built with (defaults filled in), so `merged_from` always marks the export
    stored["model"] = {**stored["model"], "finetune_mode": "frozen", "merged_from": model.finetune_mode}
    model.finetune_mode = "frozen"
    return save_checkpoint(out, model, stored, payload["class_names"], **payload.get("extra", {}))
