"""Patch-level inference: whole images in memory, by sliding windows or by resizing.

`predict_windows` is the in-memory counterpart of the whole-slide engine: the same Grid
positions (wsiseg.slide.grid), the same window weights and stripe blender (wsiseg.engine.blend)
and the same predictor protocol, blended as sum(w * p) / sum(w) on the device. Validation during training
and `wsiseg infer` both use `predict_image`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.errors import WsisegError
from wsiseg.progress import get_logger

log = get_logger("infer")

MODES = ("windowslide", "resize")


def to_tensor(image: np.ndarray, device: Any) -> Any:
    """(H, W, 3) uint8 RGB -> (3, H, W) float [0, 1] on `device`."""
    import torch

    return torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1).float().div_(255.0)


def predict_windows(image: Any, predict: Any, window: int, overlap: float = 0.25, blend: str = "gaussian",
                    batch_size: int = 8) -> Any:
    """Blended scores (K, H, W) of an image tensor (3, H, W) from overlapping windows.

    `predict(batch (B, 3, window, window)) -> (B, K, window, window)`. Images smaller than the
    window are padded white at the bottom/right; windows run in batches of `batch_size` and are
    blended by the whole-slide engine's StripeBlender, so patch-level and slide-level results agree.
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


def predict_resized(image: Any, predict: Any, size: int, multiple: int) -> Any:
    """Scores (K, H, W) of an image tensor (3, H, W) predicted at a resized copy and resized back."""
    import torch.nn.functional as F

    _, height, width = image.shape
    shape = resized_shape(height, width, size, multiple)
    small = F.interpolate(image[None], size=shape, mode="bilinear", align_corners=False, antialias=True)
    scores = predict(small.clamp(0, 1)).float()
    return F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)[0]


def predict_image(image: Any, predict: Any, mode: str, window: int, multiple: int, overlap: float = 0.25,
                  blend: str = "gaussian", batch_size: int = 8) -> Any:
    """Scores (K, H, W) of an image tensor by `mode` ("windowslide" or "resize")."""
    if mode == "windowslide":
        return predict_windows(image, predict, window, overlap, blend, batch_size)
    if mode == "resize":
        return predict_resized(image, predict, window, multiple)
    raise WsisegError(f"unknown inference mode {mode!r}: choose one of {', '.join(MODES)}")


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or the best_model.pth inside a run or checkpoints folder given instead."""
    path = Path(path)
    if not path.is_dir():
        return path
    for candidate in (path / "best_model.pth", path / "checkpoints" / "best_model.pth"):
        if candidate.is_file():
            return candidate
    raise WsisegError(f"{path} is a folder without best_model.pth or checkpoints/best_model.pth; pass the "
                      "checkpoint file itself")


def _load_model(config: str | Path | None, checkpoint: str | Path, device: Any) -> tuple[Any, dict[str, Any]]:
    """The segmenter of a checkpoint (checked against the config when one is given) and the config used."""
    from wsiseg.config import load_config
    from wsiseg.models.checkpoint import load_segmenter, read_checkpoint
    from wsiseg.train.trainer import check_compatible

    payload = read_checkpoint(checkpoint)
    stored = payload["config"]
    if config is not None:
        user = load_config(config, splits=(), check_files=False)
        check_compatible(stored, user, Path(checkpoint))
        stored = {**stored, "model": {**stored["model"], "pfm_weights_path": user["model"]["pfm_weights_path"]}}
    return load_segmenter(stored, checkpoint, str(device)), stored


def _unique_names(entries: list[dict[str, Path | None]]) -> list[str]:
    names: dict[str, Path] = {}
    for entry in entries:
        stem = Path(entry["image"]).stem
        if stem in names:
            raise WsisegError(f"images {names[stem]} and {entry['image']} have the same name; predictions are named "
                              "after the image, so rename one")
        names[stem] = Path(entry["image"])
    return list(names)


def save_label_png(labels: np.ndarray, path: Path, colors: list[tuple[int, int, int]]) -> None:
    """A lossless class-index PNG: palette mode (indices + colours) up to 256 classes, 16-bit beyond."""
    from PIL import Image

    if labels.max(initial=0) < 256:
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        flat = [v for c in colors[:256] for v in c]
        image.putpalette(flat + [0] * (768 - len(flat)))
    else:
        image = Image.fromarray(labels.astype(np.uint16))
    image.save(path)


def infer_images(config: str | Path | None, checkpoint: str | Path, input_json: str | Path, output_dir: str | Path,
                 device: str = "auto", input_size: int | None = None, mode: str = "windowslide", batch_size: int = 8,
                 overlap: float = 0.25, blend: str = "gaussian", split: str = "test", overwrite: bool = False,
                 bootstrap: int = 0) -> dict[str, Any]:
    """Segment the images of one split of a dataset JSON; writes predictions_masks/ (class-index PNGs at
    each image's original size), predictions_overlays/ and, where masks exist, metrics.json."""
    from PIL import Image

    from wsiseg.engine.predictors import BatchRunner, SegmenterPredictor
    from wsiseg.export.overlay import blend_overlay
    from wsiseg.metrics import MetricAccumulator, format_metrics
    from wsiseg.outputs import atomic_output
    from wsiseg.progress import progress_bar
    from wsiseg.store.masks import default_colors
    from wsiseg.train.data import SegmentationDataset, split_entries
    from wsiseg.devices import resolve_device

    if mode not in MODES:
        raise WsisegError(f"unknown --resize_or_windowslide {mode!r}: choose one of {', '.join(MODES)}")
    if not 0 <= overlap < 1:
        raise WsisegError(f"--overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise WsisegError(f"--batch_size must be at least 1, got {batch_size}")
    torch_device = resolve_device(device)
    checkpoint = checkpoint_file(checkpoint)
    entries = split_entries(input_json, split, need_masks=False)
    names = _unique_names(entries)
    model, stored = _load_model(config, checkpoint, torch_device)
    class_names = list(model.class_names or stored["dataset"]["class_names"])
    window = int(input_size or stored["model"]["input_size"])
    if window % model.input_multiple:
        m = model.input_multiple
        raise WsisegError(f"--input_size {window} is not a multiple of {m} (patch size / stride of "
                          f"{stored['model']['name']}); use {max(m, window // m * m)}")
    colors = default_colors(len(class_names))
    predictor = SegmenterPredictor(model, class_names, colors, stored["system"]["precision"])
    runner = BatchRunner(predictor, batch_size)
    ignore_index = stored["dataset"]["ignore_index"]
    dataset = SegmentationDataset(entries, len(class_names), ignore_index)
    accumulator = MetricAccumulator(len(class_names), ignore_index, class_names, keep_per_image=bootstrap > 0)
    with_masks = 0
    started = time.perf_counter()
    output_dir = Path(output_dir)
    with atomic_output(output_dir, overwrite=overwrite, resume=False) as partial:
        (partial / "predictions_masks").mkdir(parents=True)
        (partial / "predictions_overlays").mkdir()
        per_image = []
        with progress_bar(len(entries), f"infer ({mode})", unit="images") as advance:
            for index, name in enumerate(names):
                image, mask = dataset.load(index)
                scores = predict_image(to_tensor(image, torch_device), runner, mode, window, model.input_multiple,
                                       overlap, blend, batch_size)
                labels = scores.argmax(0).cpu().numpy().astype(np.int64)
                save_label_png(labels, partial / "predictions_masks" / f"{name}.png", colors)
                overlay = blend_overlay(image, labels, colors, skip_label=0)
                Image.fromarray(overlay).save(partial / "predictions_overlays" / f"{name}.png")
                if mask is not None:
                    cm = accumulator.update(labels, mask)
                    per_image.append({"image": name, "pixels": int(cm.sum()), "correct": int(np.trace(cm))})
                    with_masks += 1
                advance(1)
        seconds = time.perf_counter() - started
        metrics = None
        if with_masks:
            metrics = accumulator.compute(bootstrap=bootstrap)
            metrics.update({"images": with_masks, "mode": mode, "input_size": window, "overlap": overlap,
                            "blend": blend, "checkpoint": str(checkpoint), "split": split, "per_image": per_image})
            (partial / "metrics.json").write_text(json.dumps(metrics, indent=1))
            log.info("%s on %d images: %s", split, with_masks, format_metrics(metrics, ("mdice", "dice_no_bg", "miou", "pixel_acc")))
    return {"output_dir": str(output_dir), "images": len(entries), "with_masks": with_masks, "metrics": metrics,
            "seconds": seconds, "images_per_s": len(entries) / max(seconds, 1e-9)}
