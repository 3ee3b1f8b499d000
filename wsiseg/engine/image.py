"""The in-memory engine: scores of one image tensor, by sliding windows or by one resized pass.

`wsiseg infer`, validation during training and `segment --mode resize` all predict here.
Windows use the whole-slide engine's Grid positions (wsiseg.slide.grid) and stripe blender
(wsiseg.engine.blend), so patch-level and slide-level results agree. The resize pass scales the
image so that its longer side is the model's size (aspect kept, both sides multiples of the patch
size), predicts once, and resizes the scores back bilinearly with `resize_rows`, which gives any
range of rows exactly as the whole resize gives them: a large region is resized back one row
stripe at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from wsiseg.engine.choices import BLENDS, PREDICTION_MODES
from wsiseg.errors import WsisegError



@dataclass(frozen=True)
class ImageInference:
    """How an image is predicted: `mode`, the window side (or resized longer side) `size`, and for
    windows their `overlap`, `blend` weights and `batch_size`. `size` None means the model's input size."""

    mode: str = "windowslide"
    size: int | None = None
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.mode not in PREDICTION_MODES:
            raise WsisegError(f"unknown --resize_or_windowslide {self.mode!r}: choose one of {', '.join(PREDICTION_MODES)}")
        BLENDS.check(self.blend)
        if not 0 <= self.overlap < 1:
            raise WsisegError(f"--overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise WsisegError(f"--batch_size must be at least 1, got {self.batch_size}")


def to_tensor(image: np.ndarray, device: Any) -> Any:
    """(H, W, 3) uint8 RGB -> (3, H, W) float [0, 1] on `device`."""
    import torch

    return torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1).float().div_(255.0)


def predict_windows(image: Any, predict: Any, window: int, overlap: float = 0.25, blend: str = "gaussian",
                    batch_size: int = 8) -> Any:
    """Blended scores (K, H, W) of an image tensor (3, H, W) from overlapping windows.

    `predict(batch (B, 3, window, window)) -> (B, K, window, window)`. Images smaller than the
    window are padded white at the bottom/right; windows run in batches of `batch_size` and are
    blended as sum(w * p) / sum(w) by the whole-slide engine's StripeBlender on the image's device.
    """
    import torch

    from wsiseg.engine.blend import StripeBlender, window_weights
    from wsiseg.slide.grid import Grid

    _, height, width = image.shape
    padded_h, padded_w = max(height, window), max(width, window)
    if (padded_h, padded_w) != (height, width):
        image = torch.nn.functional.pad(image, (0, padded_w - width, 0, padded_h - height), value=1.0)
    positions = Grid.from_overlap(padded_w, padded_h, window, overlap).positions()
    stripes: list[np.ndarray] = []
    blender = None
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        scores = predict(torch.stack([image[:, y : y + window, x : x + window] for x, y in chunk])).float()
        if blender is None:
            blender = StripeBlender(
                padded_w, padded_h, window, scores.shape[1], window_weights(window, blend),
                lambda y0, labels, probabilities: stripes.append(probabilities),
                device=image.device, keep_probabilities=True,
            )
        for score, (x, y) in zip(scores, chunk):
            blender.add(score, x, y)
    blender.close()
    return torch.from_numpy(np.concatenate(stripes, axis=1)[:, :height, :width]).to(image.device)


def resized_shape(height: int, width: int, size: int, multiple: int) -> tuple[int, int]:
    """The (h, w) an image is resized to: longer side `size`, aspect kept, both sides multiples of `multiple`."""
    scale = size / max(height, width)
    fit = lambda n: max(multiple, int(round(n * scale / multiple)) * multiple)  # noqa: E731
    return fit(height), fit(width)


def resized_scores(image: Any, predict: Any, shape: tuple[int, int]) -> Any:
    """Scores (K, h, w) of an image tensor (3, H, W) resized to `shape` = (h, w) (bilinear, antialiased)."""
    import torch.nn.functional as F

    small = F.interpolate(image[None], size=shape, mode="bilinear", align_corners=False, antialias=True)
    return predict(small.clamp(0, 1)).float()[0]


def _taps(out_size: int, in_size: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (low, high) and the weight of high of outputs start..stop of a linear resize
    in_size -> out_size: half-pixel centres, clamped at the edges."""
    position = np.clip((np.arange(start, stop) + 0.5) * (in_size / out_size) - 0.5, 0, in_size - 1)
    low = np.floor(position).astype(np.int64)
    return low, np.minimum(low + 1, in_size - 1), (position - low).astype(np.float32)


def resize_rows(scores: Any, height: int, width: int, row0: int = 0, row1: int | None = None) -> Any:
    """Rows row0..row1 (default: all) of scores (K, h, w) resized bilinearly to (height, width).

    Half-pixel centres and clamped edges, as torch's bilinear interpolate (align_corners=False).
    Each output pixel is computed from its own two rows and columns by the same float32 operations,
    so the rows of any range are exactly those rows of the whole resize.
    """
    import torch

    row1 = height if row1 is None else row1
    device = scores.device
    y0, y1, wy = (torch.from_numpy(a).to(device) for a in _taps(height, scores.shape[1], row0, row1))
    x0, x1, wx = (torch.from_numpy(a).to(device) for a in _taps(width, scores.shape[2], 0, width))
    wy = wy[None, :, None]
    rows = scores[:, y0].mul_(1 - wy).add_(scores[:, y1].mul_(wy))
    return rows[:, :, x0].mul_(1 - wx).add_(rows[:, :, x1].mul_(wx))


def predict_resized(image: Any, predict: Any, size: int, multiple: int) -> Any:
    """Scores (K, H, W) of an image tensor (3, H, W) predicted at `resized_shape` and resized back."""
    _, height, width = image.shape
    scores = resized_scores(image, predict, resized_shape(height, width, size, multiple))
    return resize_rows(scores, height, width)


def predict_image(image: Any, predict: Any, inference: ImageInference, multiple: int) -> Any:
    """Scores (K, H, W) of an image tensor by `inference` (whose size must be set); `multiple`: the patch size."""
    if inference.size is None:
        raise ValueError("predict_image needs an ImageInference with its size set")
    if inference.mode == "windowslide":
        return predict_windows(image, predict, inference.size, inference.overlap, inference.blend,
                               inference.batch_size)
    return predict_resized(image, predict, inference.size, multiple)
