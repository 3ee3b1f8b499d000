"""The F-Seg window predictor for the whole-slide engine: RGB windows -> concept weight maps."""

from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING

import numpy as np

from wsiseg.fseg.features import FeatureExtractor
from wsiseg.fseg.modes import MODES, concept_scores

if TYPE_CHECKING:
    import torch

# distinct colours for the first concepts; further ones are spread around the hue circle
_BASE_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
]


def palette(k: int) -> list[tuple[int, int, int]]:
    """k distinct RGB colours, the same for a given k on every run."""
    colours = list(_BASE_PALETTE[:k])
    for i in range(len(colours), k):
        hue = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.55 + 0.4 * ((i // 7) % 2), 0.95 - 0.3 * ((i // 3) % 2))
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours


def concept_names(k: int) -> list[str]:
    """"concept 0" .. "concept k-1"."""
    return [f"concept {i}" for i in range(k)]


BACKGROUND_NAME = "background"
BACKGROUND_COLOR = (255, 255, 255)


class FsegPredictor:
    """(B, 3, h, w) [0, 1] RGB -> (B, 1 + k, h, w) concept weights, upsampled bilinearly to the window size.

    Output 0 is the engine's background label (windows without tissue are never run and keep
    it); its score is zero, so it only wins where every concept weight is zero. Output i + 1 is
    the weight of concept i. The engine blends these maps across overlapping windows exactly like
    probabilities and takes the argmax.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        concepts: np.ndarray,
        mode: str = "project",
        scale_before_argmax: bool = False,
    ) -> None:
        import torch

        if mode not in MODES:
            raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
        self.extractor = extractor
        self.concepts = torch.as_tensor(np.array(concepts, dtype=np.float32, copy=True), device=extractor.device)
        self.mode = mode
        self.scale_before_argmax = scale_before_argmax
        self.k = int(self.concepts.shape[0])
        self.num_outputs = self.k + 1
        self.class_names = [BACKGROUND_NAME, *concept_names(self.k)]
        self.colors = [BACKGROUND_COLOR, *palette(self.k)]
        self.input_multiple = extractor.input_multiple

    def concept_maps(self, batch: "torch.Tensor") -> "torch.Tensor":
        """(B, k, h', w') concept scores at token resolution."""
        features = self.extractor(batch)
        return concept_scores(features, self.concepts.to(features.device), self.mode, self.scale_before_argmax)

    def predict(self, batch: "torch.Tensor") -> "torch.Tensor":
        """Background + concept weight maps at the batch's size, on the batch's device."""
        import torch

        scores = self.concept_maps(batch)
        maps = torch.nn.functional.interpolate(scores, size=tuple(batch.shape[-2:]), mode="bilinear", align_corners=False)
        background = torch.zeros_like(maps[:, :1])
        return torch.cat([background, maps], dim=1).to(batch.device)
