"""Backbone activations as feature maps: ViT tokens reshaped to their grid, CNN stage outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from wsiseg.models.finetune import trunk


def is_vit(backbone: nn.Module) -> bool:
    """Whether the (possibly peft-wrapped) backbone is a timm ViT trunk."""
    return hasattr(trunk(backbone), "num_prefix_tokens") and hasattr(trunk(backbone), "blocks")


def vit_layers(backbone: nn.Module, count: int) -> list[int]:
    """`count` block indices spread evenly over the depth, the last block included."""
    depth = len(trunk(backbone).blocks)
    count = min(count, depth)
    return sorted({depth * (i + 1) // count - 1 for i in range(count)})


def feature_maps(backbone: nn.Module, x: torch.Tensor, layers: Sequence[int], norm: bool = False) -> list[torch.Tensor]:
    """Maps of the given ViT blocks (prefix tokens dropped) or CNN stages, shallow to deep, as (B, C, h, w)."""
    model = trunk(backbone)
    if is_vit(backbone):
        return model.forward_intermediates(x, indices=list(layers), norm=norm, output_fmt="NCHW",
                                           intermediates_only=True)
    stages = model(x)
    return [stages[i] for i in layers]


def token_features(backbone: nn.Module, x: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """Activations of one layer as (B, D, h, w); `x` is the *normalised* input (see `normalize`).

    ViT: output of block `layer` (default: the last block, before the final norm), prefix
    (class and register) tokens dropped, reshaped to (H/p, W/p). CNN: output of stage `layer`
    (default: the deepest stage with stride 16 or less, the granularity of a ViT-B/16).
    """
    if is_vit(backbone):
        depth = len(trunk(backbone).blocks)
        index = depth - 1 if layer is None else layer % depth
        return feature_maps(backbone, x, [index])[0]
    reductions = trunk(backbone).feature_info.reduction()
    if layer is None:
        layer = max(i for i, r in enumerate(reductions) if r <= 16)
    return feature_maps(backbone, x, [layer])[0]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel for RGB floats in [0, 1] of shape (B, 3, H, W)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
