"""Training figures drawn with Pillow: the history curves and validation sample panels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.outputs import atomic_file

SERIES_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _panel(draw: Any, box: tuple[int, int, int, int], title: str, series: dict[str, list[tuple[float, float]]],
           font: Any) -> None:
    """One line chart in `box` (x0, y0, x1, y1) with axes, ticks and a legend."""
    x0, y0, x1, y1 = box
    left, bottom, top, right = x0 + 60, y1 - 40, y0 + 30, x1 - 20
    draw.text((x0 + 60, y0 + 6), title, fill="black", font=font)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_min, x_max = min(xs), max(max(xs), min(xs) + 1)
    y_min, y_max = min(ys), max(ys)
    if y_max - y_min < 1e-9:
        y_min, y_max = y_min - 0.5, y_max + 0.5
    pad = (y_max - y_min) * 0.05
    y_min, y_max = y_min - pad, y_max + pad
    to_px = lambda x, y: (left + (x - x_min) / (x_max - x_min) * (right - left),  # noqa: E731
                          bottom - (y - y_min) / (y_max - y_min) * (bottom - top))
    for i in range(5):
        value = y_min + (y_max - y_min) * i / 4
        _, py = to_px(x_min, value)
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.text((x0 + 4, py - 6), f"{value:.3g}", fill="black", font=font)
    for epoch in sorted(set(int(x) for x in xs)):
        px, _ = to_px(epoch, y_min)
        draw.line([(px, bottom), (px, bottom + 4)], fill="black")
        if len(set(int(x) for x in xs)) <= 25 or epoch % 5 == 0:
            draw.text((px - 4, bottom + 6), str(epoch), fill="black", font=font)
    draw.text(((left + right) // 2 - 16, bottom + 22), "epoch", fill="black", font=font)
    for index, (name, values) in enumerate(series.items()):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        finite = [to_px(x, y) for x, y in values if math.isfinite(y)]
        if len(finite) > 1:
            draw.line(finite, fill=colour, width=2)
        for px, py in finite:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((right - 150, top + 4 + 14 * index), name, fill=colour, font=font)


def plot_history(history: Sequence[dict[str, Any]], path: Path, metrics: Sequence[str]) -> None:
    """training_history.png: training loss per epoch, and the validation metrics per epoch."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    image = Image.new("RGB", (1200, 420), "white")
    draw = ImageDraw.Draw(image)
    loss = {"train loss": [(h["epoch"], h["train_loss"]) for h in history]}
    validation = {name: [(h["epoch"], h["val"][name]) for h in history if h.get("val")] for name in metrics}
    _panel(draw, (0, 0, 600, 420), "training loss", loss, font)
    _panel(draw, (600, 0, 1200, 420), "validation", validation, font)
    with atomic_file(path) as temporary:
        image.save(temporary)


def sample_panel(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, colors: Sequence[Sequence[int]],
                 alpha: float, ignore_index: int) -> np.ndarray:
    """Image | ground truth overlay | prediction overlay, side by side (H, 3W + 8, 3) uint8."""
    table = np.zeros((256, 3), dtype=np.float32)
    table[: len(colors)] = np.asarray([c[:3] for c in colors], dtype=np.float32)

    def paint(labels: np.ndarray) -> np.ndarray:
        shown = np.where(labels == ignore_index, 0, labels).astype(np.int64).clip(0, 255)
        weight = np.where(shown > 0, alpha, 0.0)[..., None]
        return np.round(image * (1 - weight) + table[shown] * weight).astype(np.uint8)

    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([image, gap, paint(truth), gap, paint(prediction)], axis=1)
