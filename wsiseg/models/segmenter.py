"""The segmentation module: backbone + decoder, RGB floats in, logits at the input size out."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from wsiseg.errors import WsisegError
from wsiseg.models.choices import DECODERS, FINETUNE_MODES
from wsiseg.models.decoders import build_decoder
from wsiseg.models.features import feature_maps, is_vit, vit_layers
from wsiseg.models.finetune import apply_finetune, count_parameters
from wsiseg.models.registry import BackboneSpec, build_backbone, entry, get_spec
from wsiseg.progress import get_logger

log = get_logger("models")

FUSED_VIT_LAYERS = 4


class Segmenter(nn.Module):
    """Backbone + decoder: forward((B, 3, H, W) RGB in [0, 1]) -> logits (B, num_classes, H, W).

    It normalises with the backbone's mean/std inside, so callers pass plain RGB. H and W must
    be multiples of `input_multiple` (the patch size of a ViT, the total stride of a CNN).
    """

    def __init__(self, backbone: nn.Module, decoder: nn.Module, spec: BackboneSpec, num_classes: int,
                 layers: list[int], finetune_mode: str, norm_last: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.spec = spec
        self.num_classes = num_classes
        self.input_multiple = spec.input_multiple
        self.layers = layers
        self.finetune_mode = finetune_mode
        self.norm_last = norm_last
        self.class_names: list[str] | None = None
        self.backbone_options: dict[str, Any] = {}
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def check_input(self, height: int, width: int) -> None:
        """WsisegError when the input sides are not multiples of the patch size / stride."""
        m = self.input_multiple
        if height % m or width % m:
            fit = f"{max(m, round(height / m) * m)}x{max(m, round(width / m) * m)}"
            raise WsisegError(f"input {height}x{width} is not a multiple of {m} (patch size / stride of "
                              f"{self.spec.name}): use sizes that are multiples of {m}, e.g. {fit}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x.shape[-2], x.shape[-1])
        image = (x - self.mean) / self.std
        return self.decoder(feature_maps(self.backbone, image, self.layers, norm=self.norm_last), image)

    def train(self, mode: bool = True) -> Segmenter:
        """Train mode, except what must not move: a frozen backbone, and batch-norm statistics
        of any backbone that is not fully fine-tuned (LoRA dropout still acts in lora/dora)."""
        super().train(mode)
        if self.finetune_mode == "frozen":
            self.backbone.eval()
        elif self.finetune_mode != "full":
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def model_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The `model:` section with defaults filled in, checked for unknown values."""
    if not model_cfg or not model_cfg.get("name"):
        raise WsisegError("the config has no model.name: set it to a name from `wsiseg models`")
    from wsiseg.config import defaults

    cfg = {**defaults("model"), **{k: v for k, v in model_cfg.items() if v is not None or k == "pfm_weights_path"}}
    FINETUNE_MODES.check(cfg["finetune_mode"])
    DECODERS.check(cfg["decoder"])
    return cfg


def check_config(cfg: dict[str, Any], spec: BackboneSpec) -> None:
    """Refuse an emb_dim that disagrees with the model, or an input size off the patch multiple."""
    if cfg.get("emb_dim") is not None and int(cfg["emb_dim"]) != spec.embed_dim:
        raise WsisegError(f"model.emb_dim is {cfg['emb_dim']} but {spec.name} has embed dim {spec.embed_dim} "
                          "(the model is the truth): remove emb_dim from the config, or fix model.name")
    size, m = int(cfg["input_size"]), spec.input_multiple
    if size % m:
        raise WsisegError(f"model.input_size {size} is not a multiple of {m} (patch size / stride of {spec.name}): "
                          f"use {max(m, round(size / m) * m)}")


def build_segmenter(model_cfg: dict[str, Any], num_classes: int, load_weights: bool = True,
                    **backbone_options: Any) -> Segmenter:
    """Build backbone (with the PFM weights of the config), decoder and fine-tuning mode.

    `load_weights=False` builds the backbone on the meta device, for a checkpoint that holds
    the whole backbone (full fine-tuning, merged exports) and will be loaded with assign.
    `backbone_options` are passed to the timm builder (e.g. `depth=2` for a tiny test model);
    checkpoints record them.
    """
    cfg = model_config(model_cfg)
    spec = get_spec(cfg["name"])
    check_config(cfg, spec)
    if int(num_classes) < 1:
        raise WsisegError(f"num_classes must be at least 1, got {num_classes}")
    if not load_weights:
        backbone = build_backbone(cfg["name"], None, device="meta", **backbone_options)
    elif cfg["pfm_weights_path"] is None and entry(cfg["name"]).default_weights is None:
        backbone = build_backbone(cfg["name"], None, device="cpu", **backbone_options)
    else:
        backbone = build_backbone(cfg["name"], cfg["pfm_weights_path"], device="cpu", **backbone_options)
    progressive = cfg["decoder"] == "progressive"
    if is_vit(backbone):
        layers = vit_layers(backbone, 1 if progressive else FUSED_VIT_LAYERS)
        dims = [backbone.embed_dim] * len(layers)
        strides = [backbone.patch_embed.patch_size[0]] * len(layers)
    else:
        all_strides = backbone.feature_info.reduction()
        layers = [len(all_strides) - 1] if progressive else [i for i, s in enumerate(all_strides) if s >= 4]
        dims = [backbone.feature_info.channels()[i] for i in layers]
        strides = [all_strides[i] for i in layers]
    decoder = build_decoder(cfg["decoder"], dims, strides, int(num_classes))
    backbone = apply_finetune(backbone, cfg["finetune_mode"], cfg["lora_r"], cfg["lora_alpha"],
                              cfg["lora_dropout"], cfg["lora_target_modules"])
    model = Segmenter(backbone, decoder, spec, int(num_classes), layers, cfg["finetune_mode"],
                      norm_last=progressive and spec.kind == "vit")
    model.backbone_options = dict(backbone_options)
    if load_weights:
        trainable, total = count_parameters(model)
        log.info("%s + %s decoder, %s: trainable %s / total %s parameters (%.2f%%)", spec.name, cfg["decoder"],
                 cfg["finetune_mode"], f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model
