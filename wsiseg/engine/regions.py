"""Resize mode: each tissue region predicted in one pass of the in-memory engine's resize algorithm.

A region is resized so that its longer side is the window (aspect kept, sides multiples of the
patch size; wsiseg.engine.image, as `wsiseg infer --mode resize`), predicted, and its scores are
resized back to the region one mask stripe at a time, exactly as the whole region would be.
Overlapping regions are averaged; pixels outside every region get the background label.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from wsiseg.engine.blend import StripeSink, finalise_numpy
from wsiseg.engine.image import resize_rows, resized_scores, resized_shape, to_tensor
from wsiseg.engine.predictors import BatchRunner, Predictor
from wsiseg.engine.settings import RunSettings
from wsiseg.engine.source import SourceView
from wsiseg.store.masks import MaskStore

Region = tuple[int, int, int, int]  # x, y, w, h at the run's MPP


def tissue_regions(tissue: Any, mpp: float, width: int, height: int) -> list[Region]:
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


def read_region(view: SourceView, region: Region, window: int, mpp: float) -> np.ndarray:
    """The RGB pixels of a region at `mpp`, or coarser where it is larger than the window, so memory stays bounded
    by the window, not by the region: a slide's is read at the MPP that makes its longer side the window, a tile
    store's from the coarsest pyramid level at least as fine (under 2x the window per side)."""
    x, y, w, h = region
    factor = max(w, h) / window
    if view.kind == "tiles":
        return view.reader.read_coarse(x, y, w, h, factor)
    if factor > 1:
        rw, rh = min(window, max(1, round(w / factor))), min(window, max(1, round(h / factor)))
        return view.reader.read(round(x / factor), round(y / factor), rw, rh, mpp * factor)
    return view.reader.read(x, y, w, h, mpp)


def write_stripes(view: SourceView, regions: list[Region], low_res: list[Any], store: MaskStore, sink: StripeSink,
                  num_outputs: int, background: int) -> None:
    """Every mask stripe from the store's first unfinished row on: the regions' low-resolution scores
    (K, h, w) resized back to them and averaged, `background` outside every region."""
    keep = store.probabilities is not None
    for row0 in range(store.rows_done, view.height, store.chunk):
        row1 = min(row0 + store.chunk, view.height)
        total = np.zeros((num_outputs, row1 - row0, view.width), np.float32)
        weight = np.zeros((row1 - row0, view.width), np.float32)
        for (x, y, w, h), scores in zip(regions, low_res):
            top, bottom = max(row0, y), min(row1, y + h)
            if bottom <= top:
                continue
            total[:, top - row0 : bottom - row0, x : x + w] += resize_rows(scores, h, w, top - y, bottom - y).numpy()
            weight[top - row0 : bottom - row0, x : x + w] += 1
        probabilities = np.empty(total.shape, np.float32) if keep else None
        sink(row0, finalise_numpy(total, weight, background, probabilities), probabilities)


def predict_regions(
    view: SourceView,
    regions: list[Region],
    store: MaskStore,
    sink: StripeSink,
    predictor: Predictor,
    settings: RunSettings,
    device: Any,
    advance: Any,
) -> int:
    """Resize mode: each tissue region predicted at the window size, its scores resized back; returns the count."""
    window, mpp = settings.window, settings.mpp
    runner = BatchRunner(predictor, 1)
    multiple = int(getattr(predictor, "input_multiple", 1) or 1)
    low_res = []
    for region in regions:
        pixels = read_region(view, region, window, mpp)
        shape = resized_shape(region[3], region[2], window, multiple)
        low_res.append(resized_scores(to_tensor(pixels, device), runner, shape).cpu())
        advance(1)
    write_stripes(view, regions, low_res, store, sink, predictor.num_outputs, settings.background)
    return len(regions)
