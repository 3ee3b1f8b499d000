"""A registry of backbones: one short builder per pathology foundation model, plus any timm model.

Every builder returns a module built with `pretrained=False` (no network, ever): a timm module,
or for MUSK (a BEiT-3 multiway transformer timm lacks) wsiseg's own vision tower with the same
interface (wsiseg/models/musk.py). ViTs are built without a classifier head and with
`dynamic_img_size=True`, so any input whose sides are a multiple of the patch size works; CNNs
are built as timm feature extractors (`features_only`). An entry whose layers are not named
`qkv` / `proj` declares the LoRA targets used when the config keeps that default.
Each entry declares the facts `wsiseg models` prints (embed dim, patch, prefix tokens,
parameter count), so listing the registry builds nothing; `get_spec` reads the same facts from a
build on the meta device, and the tests hold the two equal for every entry.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from wsiseg.errors import WsisegError
from wsiseg.progress import get_logger

log = get_logger("models")

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))

TIMM_LAYOUT = "timm state dict (.bin/.pth/.safetensors; `model`/`state_dict`/`teacher` wrappers and `module.`/`backbone.` prefixes accepted)"
VIT_HF_LAYOUT = "Hugging Face ViTModel directory (config.json + weights), remapped to timm"
DINOV2_HF_LAYOUT = "Hugging Face Dinov2Model directory (config.json + weights), remapped to timm"
MUSK_LAYOUT = ("MUSK checkpoint (musk.pth or model.safetensors: `beit3.` over torchscale BEiT3 names); the vision "
               "expert is kept, the language expert, text embedding and heads are ignored")


@dataclass(frozen=True)
class Facts:
    """What a build of an entry shows: embed dim, patch size (a CNN's deepest stride), prefix tokens,
    trunk parameters, and for a CNN its stage channels and strides."""

    embed_dim: int
    patch_size: int
    num_prefix_tokens: int
    params: int
    feature_dims: tuple[int, ...] = ()
    feature_strides: tuple[int, ...] = ()


@dataclass(frozen=True)
class Entry:
    """A registered builder, its declared facts, and the facts that cannot be read from the module."""

    name: str
    facts: Facts | None
    builder: Callable[..., Any]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str
    architecture: str
    kind: str = "vit"
    default_weights: Callable[[], Path] | None = None
    remap: str | None = None
    lora_targets: tuple[str, ...] | None = None


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of wsiseg needs to know about a backbone (read from a meta-device build)."""

    name: str
    kind: str
    architecture: str
    embed_dim: int
    patch_size: int
    num_prefix_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_multiple: int
    checkpoint_layout: str
    params: int
    feature_dims: tuple[int, ...] = field(default=())
    feature_strides: tuple[int, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of the spec."""
        return {
            "name": self.name,
            "kind": self.kind,
            "architecture": self.architecture,
            "embed_dim": self.embed_dim,
            "patch_size": self.patch_size,
            "num_prefix_tokens": self.num_prefix_tokens,
            "mean": list(self.mean),
            "std": list(self.std),
            "input_multiple": self.input_multiple,
            "checkpoint_layout": self.checkpoint_layout,
            "params": self.params,
        }


_REGISTRY: dict[str, Entry] = {}


def register(
    name: str,
    facts: Facts | None,
    norm: tuple[tuple[float, float, float], tuple[float, float, float]],
    architecture: str,
    layout: str = TIMM_LAYOUT,
    **options: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding a builder to the registry under `name`."""

    def add(builder: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[name] = Entry(name, facts, builder, norm[0], norm[1], layout, architecture, **options)
        return builder

    return add


def _vit(architecture: str, plain_bicubic: bool = False, **kwargs: Any) -> Any:
    """A timm ViT trunk: no classifier head, position embeddings interpolated for any input size.

    timm resamples the position grid with antialiased bicubic, as the timm-native checkpoints and
    Hugging Face's Dinov2WithRegistersModel do; `plain_bicubic` resamples it without antialiasing, as
    Hugging Face's ViTModel and Dinov2Model do, so off-grid tokens equal those of the checkpoint's own code.
    """
    import types

    import timm

    kwargs.setdefault("img_size", 224)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    if plain_bicubic:
        model._pos_embed = types.MethodType(_plain_bicubic_pos_embed, model)
    return model


def _plain_bicubic_pos_embed(self: Any, x: Any) -> Any:
    """Prefix tokens and position embeddings for NHWC patch tokens, the grid resampled by plain bicubic."""
    import torch
    from timm.layers import resample_abs_pos_embed

    batch, height, width, dim = x.shape
    prefix = [token.expand(batch, -1, -1) for token in (self.cls_token, self.reg_token) if token is not None]
    positions = resample_abs_pos_embed(
        self.pos_embed, new_size=(height, width), old_size=self.patch_embed.grid_size,
        num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens, antialias=False,
    )
    x = x.reshape(batch, height * width, dim)
    if self.no_embed_class:
        x = torch.cat([*prefix, x + positions], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + positions
    return self.pos_drop(x)


def _swiglu() -> dict[str, Any]:
    """The packed SwiGLU MLP with SiLU used by UNI 2, Virchow and the DINOv2 giants."""
    import torch.nn as nn
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


def _hf_layernorm() -> dict[str, Any]:
    """LayerNorm with the eps of Hugging Face's ViTModel (1e-12)."""
    from functools import partial

    import torch.nn as nn

    return {"norm_layer": partial(nn.LayerNorm, eps=1e-12)}


@register("uni_v1", Facts(1024, 16, 1, 303_350_784), IMAGENET, "ViT-L/16, LayerScale 1e-5")
def uni_v1(**kw: Any) -> Any:
    return _vit("vit_large_patch16_224", init_values=1e-5, **kw)


@register("uni_v2", Facts(1536, 14, 9, 681_394_176), IMAGENET, "ViT-H/14-like: 1536 wide, 24 deep, SwiGLU, 8 registers")
def uni_v2(**kw: Any) -> Any:
    return _vit(
        "vit_giant_patch14_224", depth=24, num_heads=24, embed_dim=1536, mlp_ratio=2.66667 * 2,
        reg_tokens=8, no_embed_class=True, init_values=1e-5, **_swiglu(), **kw,
    )


@register("conch_v1", Facts(768, 16, 1, 86_250_240), CLIP, "ViT-B/16 at 448 (CONCH vision trunk)",
          TIMM_LAYOUT.replace("accepted", "accepted; the CONCH open_clip checkpoint's `visual.trunk.` part is used"))
def conch_v1(**kw: Any) -> Any:
    return _vit("vit_base_patch16_224", **{"img_size": 448, **kw})


@register("conch_v1_5", Facts(1024, 16, 1, 303_952_896), IMAGENET, "ViT-L/16 at 448, LayerScale 1e-6")
def conch_v1_5(**kw: Any) -> Any:
    return _vit("vit_large_patch16_224", init_values=1e-6, **{"img_size": 448, **kw})


@register("virchow_v1", Facts(1280, 14, 1, 631_229_184), IMAGENET, "ViT-H/14, SwiGLU (mlp 5.3375), LayerScale 1e-5")
def virchow_v1(**kw: Any) -> Any:
    return _vit("vit_huge_patch14_224", mlp_ratio=5.3375, init_values=1e-5, **_swiglu(), **kw)


@register("virchow_v2", Facts(1280, 14, 5, 631_239_424), IMAGENET,
          "ViT-H/14, SwiGLU (mlp 5.3375), LayerScale 1e-5, 4 registers")
def virchow_v2(**kw: Any) -> Any:
    return _vit("vit_huge_patch14_224", mlp_ratio=5.3375, init_values=1e-5, reg_tokens=4, **_swiglu(), **kw)


@register("phikon", Facts(768, 16, 1, 85_798_656), IMAGENET, "ViT-B/16", VIT_HF_LAYOUT)
def phikon(**kw: Any) -> Any:
    return _vit("vit_base_patch16_224", plain_bicubic=True, **_hf_layernorm(), **kw)


@register("phikon_v2", Facts(1024, 16, 1, 303_350_784), IMAGENET, "ViT-L/16 DINOv2-style, LayerScale", DINOV2_HF_LAYOUT)
def phikon_v2(**kw: Any) -> Any:
    return _vit("vit_large_patch16_224", plain_bicubic=True, init_values=1e-5, **kw)


@register("hoptimus_0", Facts(1536, 14, 5, 1_134_774_272), HOPTIMUS, "ViT-g/14 DINOv2, 4 registers")
def hoptimus_0(**kw: Any) -> Any:
    return _vit("vit_giant_patch14_reg4_dinov2", init_values=1e-5, **kw)


@register("hoptimus_1", Facts(1536, 14, 5, 1_134_774_272), HOPTIMUS, "ViT-g/14 DINOv2, 4 registers")
def hoptimus_1(**kw: Any) -> Any:
    return _vit("vit_giant_patch14_reg4_dinov2", init_values=1e-5, **kw)


@register("gigapath", Facts(1536, 16, 1, 1_134_953_984), IMAGENET, "ViT-g/16 DINOv2-style (40 deep, 1536 wide, SwiGLU)")
def gigapath(**kw: Any) -> Any:
    return _vit("vit_giant_patch14_dinov2", patch_size=16, depth=40, num_heads=24, embed_dim=1536,
                mlp_ratio=5.33334, init_values=1e-5, **kw)


@register("midnight12k", Facts(1536, 14, 1, 1_134_769_664), HALF, "ViT-g/14 DINOv2", DINOV2_HF_LAYOUT)
def midnight12k(**kw: Any) -> Any:
    return _vit("vit_giant_patch14_dinov2", plain_bicubic=True, **kw)


@register("kaiko-vits8", Facts(384, 8, 1, 21_670_272), HALF, "ViT-S/8")
def kaiko_vits8(**kw: Any) -> Any:
    return _vit("vit_small_patch8_224", **kw)


@register("kaiko-vits16", Facts(384, 16, 1, 21_665_664), HALF, "ViT-S/16")
def kaiko_vits16(**kw: Any) -> Any:
    return _vit("vit_small_patch16_224", **kw)


@register("kaiko-vitb8", Facts(768, 8, 1, 85_807_872), HALF, "ViT-B/8")
def kaiko_vitb8(**kw: Any) -> Any:
    return _vit("vit_base_patch8_224", **kw)


@register("kaiko-vitb16", Facts(768, 16, 1, 85_798_656), HALF, "ViT-B/16")
def kaiko_vitb16(**kw: Any) -> Any:
    return _vit("vit_base_patch16_224", **kw)


@register("kaiko-vitl14", Facts(1024, 14, 5, 303_230_976), HALF, "ViT-L/14 DINOv2, 4 registers")
def kaiko_vitl14(**kw: Any) -> Any:
    return _vit("vit_large_patch14_reg4_dinov2", **kw)


@register("lunit_vits8", Facts(384, 8, 1, 21_670_272), LUNIT, "ViT-S/8")
def lunit_vits8(**kw: Any) -> Any:
    return _vit("vit_small_patch8_224", **kw)


@register("hibou_l", Facts(1024, 14, 5, 303_230_976), HIBOU, "ViT-L/14 DINOv2, 4 registers", DINOV2_HF_LAYOUT)
def hibou_l(**kw: Any) -> Any:
    return _vit("vit_large_patch14_reg4_dinov2", **kw)


@register("musk", Facts(1024, 16, 1, 303_936_512), HALF, "BEiT-3 multiway ViT-L/16 at 384, sub-LN (vision expert)",
          MUSK_LAYOUT, remap="musk", lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"))
def musk(**kw: Any) -> Any:
    from wsiseg.models.musk import MuskVision

    return MuskVision(**kw)


@register("pathorchestra", Facts(1024, 16, 1, 303_350_784), IMAGENET, "ViT-L/16, LayerScale 1e-5")
def pathorchestra(**kw: Any) -> Any:
    return _vit("vit_large_patch16_224", init_values=1e-5, **kw)


@register("patho3dmatrix-vision", Facts(1024, 16, 1, 303_350_784), IMAGENET, "ViT-L/16, LayerScale 1e-5",
          TIMM_LAYOUT.replace("accepted", "accepted; DINO `teacher` dict with `backbone.` prefix"))
def patho3dmatrix_vision(**kw: Any) -> Any:
    return _vit("vit_large_patch16_224", init_values=1e-5, **kw)


def _efficientnet_weights() -> Path:
    """The verified ImageNet weights from the sample cache; never downloads (run time stays offline)."""
    from wsiseg.samples import cached_sample

    return cached_sample("efficientnet_lite0_pth")


@register("efficientnet_lite0_imagenet", Facts(320, 32, 0, 2_958_848, (16, 24, 40, 112, 320), (2, 4, 8, 16, 32)),
          HALF, "EfficientNet-Lite0 (timm tf_efficientnet_lite0), ImageNet",
          "EfficientNet-Lite0 ImageNet state dict (efficientnet-lite0-57934424.pth), remapped to timm",
          kind="cnn", default_weights=_efficientnet_weights, remap="in_order")
def efficientnet_lite0_imagenet(classifier: bool = False, **kw: Any) -> Any:
    import timm

    if classifier:
        return timm.create_model("tf_efficientnet_lite0", pretrained=False, **kw)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, **kw)


@lru_cache(maxsize=None)
def _timm_entry(name: str) -> Entry:
    """An entry for `timm:<architecture>`: a ViT trunk or a CNN feature extractor."""
    import timm
    import torch

    architecture = name.split(":", 1)[1]
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise WsisegError(f"timm has no model {architecture!r}{hint} (list them with timm.list_models())")
    with torch.device("meta"):
        probe = timm.create_model(architecture, pretrained=False, num_classes=0)
    config = getattr(probe, "pretrained_cfg", {}) or {}
    mean = tuple(config.get("mean", IMAGENET[0]))
    std = tuple(config.get("std", IMAGENET[1]))
    is_vit = hasattr(probe, "patch_embed") and hasattr(probe, "num_prefix_tokens") and hasattr(probe, "blocks")

    def build(classifier: bool = False, **kw: Any) -> Any:
        if is_vit:
            return timm.create_model(architecture, pretrained=False, num_classes=0, dynamic_img_size=True, **kw)
        return timm.create_model(architecture, pretrained=False, features_only=not classifier, **kw)

    return Entry(name, None, build, mean, std, TIMM_LAYOUT, f"timm {architecture}", kind="vit" if is_vit else "cnn")


def entry(name: str) -> Entry:
    """The registry entry for `name`, or a WsisegError suggesting the closest names."""
    if name.startswith("timm:"):
        return _timm_entry(name)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise WsisegError(
            f"unknown model {name!r}: {hint}run `wsiseg models` for the list, or use timm:<name> for any timm model"
        )
    return _REGISTRY[name]


def names() -> list[str]:
    """Every registered name."""
    return list(_REGISTRY)


def create(name: str, device: str = "meta", **kwargs: Any) -> Any:
    """Build the architecture of `name` with random (or meta) parameters on `device`."""
    import torch

    found = entry(name)
    with torch.device(device):
        model = found.builder(**kwargs)
    if found.lora_targets:
        model.default_lora_targets = found.lora_targets  # what LoRA adapts when the config keeps [qkv, proj]
    return model


@lru_cache(maxsize=None)
def get_spec(name: str) -> BackboneSpec:
    """The spec of a backbone, read from a build on the meta device."""
    found = entry(name)
    model = create(name, "meta")
    params = sum(p.numel() for p in model.parameters())
    if found.kind == "vit":
        patch = model.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, tuple) else int(patch)
        return BackboneSpec(
            name=name, kind="vit", architecture=found.architecture, embed_dim=model.embed_dim, patch_size=patch,
            num_prefix_tokens=model.num_prefix_tokens, mean=found.mean, std=found.std, input_multiple=patch,
            checkpoint_layout=found.layout, params=params,
            feature_dims=(model.embed_dim,), feature_strides=(patch,),
        )
    info = model.feature_info
    dims, strides = tuple(info.channels()), tuple(info.reduction())
    return BackboneSpec(
        name=name, kind="cnn", architecture=found.architecture, embed_dim=dims[-1], patch_size=strides[-1],
        num_prefix_tokens=0, mean=found.mean, std=found.std, input_multiple=max(strides),
        checkpoint_layout=found.layout, params=params, feature_dims=dims, feature_strides=strides,
    )


def declared_spec(name: str) -> BackboneSpec:
    """The spec of a registry entry from its declared facts: no torch, no build (what `wsiseg models` shows)."""
    found = entry(name)
    facts = found.facts
    if facts is None:
        return get_spec(name)
    vit = found.kind == "vit"
    return BackboneSpec(
        name=name, kind=found.kind, architecture=found.architecture, embed_dim=facts.embed_dim,
        patch_size=facts.patch_size, num_prefix_tokens=facts.num_prefix_tokens, mean=found.mean, std=found.std,
        input_multiple=facts.patch_size if vit else max(facts.feature_strides), checkpoint_layout=found.layout,
        params=facts.params, feature_dims=(facts.embed_dim,) if vit else facts.feature_dims,
        feature_strides=(facts.patch_size,) if vit else facts.feature_strides,
    )


def list_specs() -> list[BackboneSpec]:
    """Declared specs of every registry entry (nothing is built)."""
    return [declared_spec(n) for n in _REGISTRY]


def build_backbone(name: str, weights_path: str | Path | None = None, device: str = "meta", **kwargs: Any) -> Any:
    """Build a backbone; with `weights_path` load it (meta build + assign), else default or random weights.

    `device="meta"` without weights gives a parameter-free skeleton (instant, for inspection);
    with weights, "meta" means the CPU.
    A registry entry with default weights (efficientnet_lite0_imagenet) uses them when
    `weights_path` is None. Random initialisation is logged as a warning.
    """
    found = entry(name)
    if weights_path is None and found.default_weights is not None and device != "meta":
        weights_path = found.default_weights()
    if weights_path is None:
        if device != "meta":
            log.warning("%s: no weights given, the backbone is randomly initialised (pass --weights, or set "
                        "model.pfm_weights_path in a training config)", name)
        return create(name, device, **kwargs)
    return load_backbone_weights(name, Path(weights_path), device=device, **kwargs)


def load_backbone_weights(name: str, path: Path, device: str = "cpu", **kwargs: Any) -> Any:
    """Build `name` on the meta device and load the weights at `path` into it strictly, then move to `device`."""
    from wsiseg.models import weights

    found = entry(name)
    source = weights.resolve_weights_file(path)
    raw = weights.read_backbone_state(source)
    if found.kind == "cnn":
        skeleton = create(name, "meta", **kwargs)
        with_head = create(name, "meta", **{**kwargs, "classifier": True}).state_dict()
        state = weights.cnn_state(raw, with_head, skeleton.state_dict(), str(source), found.remap == "in_order")
    else:
        if found.remap == "musk":
            from wsiseg.models.musk import remap_published

            raw = remap_published(raw, str(source))
        skeleton = create(name, "meta", **kwargs)
        state = weights.vit_state(raw, skeleton)
        image_size = weights.native_image_size(state, skeleton) if "img_size" not in kwargs else None
        if image_size:
            log.info("%s: checkpoint position embeddings are for %d px; building at that size", name, image_size)
            skeleton = create(name, "meta", img_size=image_size, **kwargs)
            state = weights.vit_state(raw, skeleton)
    return weights.assign(skeleton, state, str(source), name, "cpu" if device == "meta" else device)
