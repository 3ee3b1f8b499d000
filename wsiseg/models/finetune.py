"""Fine-tuning modes of the backbone: `frozen`, `full`, and peft `lora` / `dora`.

LoRA follows peft's convention: the update B·A is scaled by `lora_alpha / lora_r` (rank 8,
alpha 16 gives scale 2). Target modules are short names matched against the end of module
names inside the transformer blocks (`qkv`, `proj` = attention; `fc1`, `fc2` = MLP); the
patch embedding is never targeted. A backbone whose layers have other names (MUSK: `q_proj`,
`k_proj`, `v_proj`, `out_proj`) carries `default_lora_targets`, used while the config keeps the
default [qkv, proj]. If no module matches, a WsisegError lists the names that would, so LoRA can
never silently do nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from wsiseg.errors import WsisegError
from wsiseg.models.choices import FINETUNE_MODES
from wsiseg.progress import get_logger

log = get_logger("models.finetune")

DEFAULT_TARGETS = ("qkv", "proj")


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear and conv layers LoRA may target: those inside `blocks` when the model has blocks."""
    scope = "blocks." if hasattr(model, "blocks") else ""
    return [(name, module) for name, module in model.named_modules()
            if name.startswith(scope) and isinstance(module, (nn.Linear, nn.Conv2d))]


def find_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the layers whose name ends with one of `targets`; WsisegError when none does."""
    found = [name for name, _ in _candidates(model)
             if any(name == t or name.endswith("." + t) for t in targets)]
    if not found:
        available = sorted({name.rsplit(".", 1)[-1] for name, _ in _candidates(model)})
        raise WsisegError(
            f"LoRA target modules {list(targets)} match no layer of this backbone; "
            f"set model.lora_target_modules to some of: {', '.join(available[:12])}"
        )
    return found


def apply_finetune(backbone: nn.Module, mode: str, rank: int = 8, alpha: float = 16,
                   dropout: float = 0.0, targets: Sequence[str] | None = None) -> nn.Module:
    """Set which backbone parameters train (the mode's entry in FINETUNE_MODES); lora/dora return the peft-wrapped backbone."""
    return FINETUNE_MODES.load(mode)(backbone, rank, alpha, dropout, targets)


def train_all(backbone: nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str] | None) -> nn.Module:
    """`full`: every backbone parameter trains (the LoRA settings are unused)."""
    return backbone.requires_grad_(True)


def freeze(backbone: nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str] | None) -> nn.Module:
    """`frozen`: no backbone parameter trains (the LoRA settings are unused)."""
    return backbone.requires_grad_(False)


def add_lora(backbone: nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str] | None) -> nn.Module:
    """`lora`: peft LoRA adapters on the target layers."""
    return _adapt(backbone, "lora", rank, alpha, dropout, targets)


def add_dora(backbone: nn.Module, rank: int, alpha: float, dropout: float, targets: Sequence[str] | None) -> nn.Module:
    """`dora`: peft DoRA (weight-decomposed LoRA) adapters on the target layers."""
    return _adapt(backbone, "dora", rank, alpha, dropout, targets)


def _adapt(backbone: nn.Module, mode: str, rank: int, alpha: float, dropout: float,
           targets: Sequence[str] | None) -> nn.Module:
    """The peft-wrapped backbone with LoRA (or DoRA) adapters; WsisegError when peft places fewer than asked."""
    from peft import LoraConfig, get_peft_model

    if targets is None or tuple(targets) == DEFAULT_TARGETS:  # the config default: the backbone's own, where it has one
        targets = getattr(trunk(backbone), "default_lora_targets", DEFAULT_TARGETS)
    names = find_targets(backbone, list(targets))
    config = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=names,
                        use_dora=mode == "dora", bias="none")
    wrapped = get_peft_model(backbone, config)
    adapted = [n for n, m in trunk(wrapped).named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0]
    if len(adapted) != len(names):
        raise WsisegError(f"{mode}: expected adapters on {len(names)} layers but peft placed {len(adapted)}; "
                          "choose other model.lora_target_modules")
    log.info("%s on %d layers (%s...), rank %d, alpha %s (scale alpha/r = %.3g)",
             mode, len(names), ", ".join(names[:2]), rank, alpha, alpha / rank)
    return wrapped


def trunk(backbone: nn.Module) -> nn.Module:
    """The timm module inside a peft wrapper (or the module itself)."""
    from_peft = getattr(getattr(backbone, "base_model", None), "model", None)
    return from_peft if isinstance(from_peft, nn.Module) and hasattr(backbone, "peft_config") else backbone


def is_peft(backbone: nn.Module) -> bool:
    """Whether the backbone is wrapped by peft."""
    return hasattr(backbone, "peft_config")


def adapter_state(backbone: nn.Module) -> dict[str, Any]:
    """The adapter weights of a peft-wrapped backbone (LoRA A/B, DoRA magnitudes)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(backbone)


def load_adapter_state(backbone: nn.Module, state: dict[str, Any]) -> None:
    """Load adapter weights into a peft-wrapped backbone, refusing any that do not fit."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(backbone, state)
    bad = [k for k in result.unexpected_keys if "lora_" in k]
    if bad:
        raise WsisegError(f"the checkpoint's adapter does not fit this backbone ({len(bad)} unexpected keys, e.g. {bad[0]}); "
                          "load it with the model config it was trained with")


def merge(backbone: nn.Module) -> nn.Module:
    """Fold LoRA/DoRA updates into the base weights and return the plain timm module."""
    return backbone.merge_and_unload() if is_peft(backbone) else backbone


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
