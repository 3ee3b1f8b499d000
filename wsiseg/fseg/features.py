"""ReLU'd token features of one backbone layer for batches of RGB windows, on a chosen device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsiseg.devices import resolve_device
from wsiseg.errors import WsisegError
from wsiseg.model_cache import file_stamp, last_loaded

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "efficientnet_lite0_imagenet"
DEFAULT_LAYER = -1  # the last ViT block (before the final norm) or the deepest CNN stage


@dataclass
class FeatureExtractor:
    """A backbone, its spec and a layer: (B, 3, h, w) [0, 1] RGB -> ReLU'd (B, D, h/p, w/p) float32.

    `layer` is the non-negative block (ViT) or stage (CNN) index, so banks record it unambiguously.
    """

    model: str
    backbone: Any
    spec: Any
    layer: int
    feature_dim: int
    device: "torch.device"
    precision: str = "auto"

    @property
    def input_multiple(self) -> int:
        """Window sides must be a multiple of this (the patch size or the CNN's total stride)."""
        return int(self.spec.input_multiple)

    def __call__(self, batch: "torch.Tensor") -> "torch.Tensor":
        import torch

        from wsiseg.engine.predictors import autocast_dtype
        from wsiseg.models.features import normalize, token_features

        x = normalize(batch.to(self.device, torch.float32), self.spec.mean, self.spec.std)
        dtype = autocast_dtype(self.device, self.precision)
        with torch.inference_mode():
            if dtype is None:
                features = token_features(self.backbone, x, self.layer)
            else:
                with torch.autocast(device_type=self.device.type, dtype=dtype):
                    features = token_features(self.backbone, x, self.layer)
        return torch.relu(features.float())


def load_extractor(
    model: str = DEFAULT_MODEL,
    weights: str | Path | None = None,
    layer: int = DEFAULT_LAYER,
    device: str = "auto",
    precision: str = "auto",
) -> FeatureExtractor:
    """Build `model` (with `weights`, or its default weights) in eval mode and check `layer`; the backbone
    this process built last is reused when the same one is asked for again (wsiseg.model_cache)."""
    from wsiseg.models.finetune import trunk
    from wsiseg.models.registry import build_backbone, get_spec

    spec = get_spec(model)
    if spec.kind == "cnn":
        count = len(spec.feature_dims)
        if not -count <= layer < count:
            raise WsisegError(f"model {model} has {count} feature stages: choose --layer in {-count}..{count - 1}")
        feature_dim = int(spec.feature_dims[layer])
        layer %= count
    else:
        feature_dim = int(spec.embed_dim)
    resolved = resolve_device(device)
    key = ["backbone", model, file_stamp(weights), str(resolved)]
    backbone = last_loaded(key, lambda: build_backbone(model, weights, device=str(resolved)).eval())
    if spec.kind != "cnn":
        depth = len(trunk(backbone).blocks)
        if not -depth <= layer < depth:
            raise WsisegError(f"model {model} has {depth} blocks: choose --layer in {-depth}..{depth - 1}")
        layer %= depth
    return FeatureExtractor(model, backbone, spec, layer, feature_dim, resolved, precision)
