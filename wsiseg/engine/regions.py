"""Resize mode: each tissue region resized to the model input, its prediction resized back in stripes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from wsiseg.engine.blend import StripeSink
from wsiseg.engine.predictors import BatchRunner, Predictor
from wsiseg.engine.settings import RunSettings
from wsiseg.engine.source import SourceView
from wsiseg.store.masks import MaskStore


def tissue_regions(tissue: Any, mpp: float, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x, y, w, h) at `mpp` of the connected tissue regions, top to bottom."""
    from scipy import ndimage

    labelled, count = ndimage.label(tissue.mask)
    factor = tissue.mpp / mpp
    boxes = []
    for rows, cols in ndimage.find_objects(labelled):
        x0, y0 = int(math.floor(cols.start * factor)), int(math.floor(rows.start * factor))
        x1 = min(int(math.ceil(cols.stop * factor)), width)
        y1 = min(int(math.ceil(rows.stop * factor)), height)
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1 - x0, y1 - y0))
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def resample_rows(scores: np.ndarray, out_height: int, out_width: int, row0: int, row1: int) -> np.ndarray:
    """Rows row0..row1 of `scores` (K, h, w) bilinearly resized to (out_height, out_width) (half-pixel centres)."""

    def axis(out_size: int, in_size: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = np.clip((np.arange(start, stop) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
        low = np.floor(position).astype(np.int64)
        return low, np.minimum(low + 1, in_size - 1), (position - low).astype(np.float32)

    y0, y1, wy = axis(out_height, scores.shape[1], row0, row1)
    x0, x1, wx = axis(out_width, scores.shape[2], 0, out_width)
    rows = scores[:, y0] * (1 - wy)[None, :, None] + scores[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def predict_regions(
    view: SourceView,
    regions: list[tuple[int, int, int, int]],
    store: MaskStore,
    sink: StripeSink,
    predictor: Predictor,
    settings: RunSettings,
    device: Any,
    advance: Any,
) -> int:
    """Resize mode: each tissue region resized to the model input, its prediction resized back."""
    import torch
    from PIL import Image

    window, mpp = settings.window, settings.mpp
    runner = BatchRunner(predictor, 1)
    low_res: list[np.ndarray] = []
    for x, y, w, h in regions:
        factor = max(w, h) / window
        if view.kind == "slide" and factor > 1:
            read_mpp = mpp * factor
            rw, rh = min(window, max(1, round(w / factor))), min(window, max(1, round(h / factor)))
            pixels = view.reader.read(round(x / factor), round(y / factor), rw, rh, read_mpp)
        else:
            pixels = view.reader.read(x, y, w, h, mpp)
            if factor > 1:
                rw, rh = min(window, max(1, round(w / factor))), min(window, max(1, round(h / factor)))
                pixels = np.asarray(Image.fromarray(pixels).resize((rw, rh), Image.Resampling.BOX))
        canvas = np.full((window, window, 3), 255, np.uint8)
        canvas[: pixels.shape[0], : pixels.shape[1]] = pixels[:window, :window]
        batch = torch.from_numpy(canvas).to(device).permute(2, 0, 1)[None].float().div_(255.0)
        scores = runner(batch)[0, :, : pixels.shape[0], : pixels.shape[1]]
        low_res.append(scores.float().cpu().numpy())
        advance(1)
    stripe = store.chunk
    num_outputs = predictor.num_outputs
    for row0 in range(store.rows_done, view.height, stripe):
        row1 = min(row0 + stripe, view.height)
        total = np.zeros((num_outputs, row1 - row0, view.width), np.float32)
        weight = np.zeros((row1 - row0, view.width), np.float32)
        for (x, y, w, h), scores in zip(regions, low_res):
            top, bottom = max(row0, y), min(row1, y + h)
            if bottom <= top:
                continue
            total[:, top - row0 : bottom - row0, x : x + w] += resample_rows(scores, h, w, top - y, bottom - y)
            weight[top - row0 : bottom - row0, x : x + w] += 1
        covered = weight > 0
        probabilities = total / np.where(covered, weight, 1)[None]
        labels = np.argmax(probabilities, axis=0)
        labels[~covered] = settings.background
        sink(row0, labels, probabilities if store.probabilities is not None else None)
    return len(regions)
