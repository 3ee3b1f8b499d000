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
        torch.save(payload, handle)  # through a Python file: a full disk is an OSError, not torch's RuntimeError
        handle.flush()
        os.fsync(handle.fileno())
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file written by `save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise WsisegError(f"checkpoint not found: {path}; pass the .pth written by `wsiseg train` (checkpoints/best_model.pth)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure means a corrupt or foreign file
        raise WsisegError(f"cannot read checkpoint {path}: {type(error).__name__}; the file is corrupt or not a wsiseg checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WsisegError(f"{path} is not a wsiseg segmenter checkpoint; pass a checkpoint written by `wsiseg train`")
    return payload


def _config_from(config: dict[str, Any] | str | Path | None, stored: dict[str, Any]) -> dict[str, Any]:
    """The stored config, with the user's PFM weights path when a config is given."""
    if config is None:
        return copy.deepcopy(stored)
    if not isinstance(config, dict):
        from wsiseg.config import load_config

        config = load_config(config, splits=(), check_files=False)
    merged = copy.deepcopy(stored)
    user_model = config.get("model", {}) or {}
    if user_model.get("name") not in (None, stored["model"]["name"]):
        raise WsisegError(f"the config's model.name {user_model['name']!r} differs from the checkpoint's "
                          f"{stored['model']['name']!r}: use the config the checkpoint was trained with")
    if "pfm_weights_path" in user_model:
        merged["model"]["pfm_weights_path"] = user_model["pfm_weights_path"]
    return merged


def load_segmenter(config: dict[str, Any] | str | Path | None, checkpoint: str | Path, device: str = "cpu") -> Segmenter:
    """Rebuild the segmenter of a checkpoint in eval mode on `device` (config None: the stored one)."""
    payload = read_checkpoint(checkpoint)
    config = _config_from(config, payload["config"])
    cfg = model_config(config["model"])
    kind = payload["backbone_state"]
    whole = kind == "full" and cfg["finetune_mode"] in ("full", "frozen")
    model = build_segmenter(cfg, payload["num_classes"], load_weights=not whole, **payload.get("backbone_options", {}))
    if whole:
        model.backbone.load_state_dict(payload["backbone"], strict=True, assign=True)
    elif kind == "full":
        model.backbone.load_state_dict(payload["backbone"], strict=True)
    elif kind == "adapter":
        load_adapter_state(model.backbone, payload["backbone"])
    model.decoder.load_state_dict(payload["decoder"], strict=True)
    model.class_names = list(payload["class_names"])
    return model.to(torch.device(device)).eval()


def merge_checkpoint(checkpoint: str | Path, out: str | Path, config: dict[str, Any] | str | Path | None = None,
                     overwrite: bool = False) -> Path:
    """Export a checkpoint as a plain model: LoRA/DoRA folded into the weights, whole backbone stored."""
    out = Path(out)
    check_writable(out, overwrite)
    model = load_segmenter(config, checkpoint, "cpu")
    payload = read_checkpoint(checkpoint)
    model.backbone = merge(model.backbone)
    stored = _config_from(config, payload["config"])
    stored["model"] = {**stored["model"], "finetune_mode": "frozen", "merged_from": stored["model"].get("finetune_mode")}
    model.finetune_mode = "frozen"
    return save_checkpoint(out, model, stored, payload["class_names"], **payload.get("extra", {}))
