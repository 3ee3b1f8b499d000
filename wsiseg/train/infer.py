"""`wsiseg infer`: the images of one split of a dataset JSON segmented with a trained checkpoint.

Each image is predicted in memory by wsiseg.engine.image (sliding windows or one resized pass,
the same engine validation and `segment --mode resize` use); this module loads the checkpoint,
writes the class-index masks and overlays, and the metrics where masks exist.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.engine.image import ImageInference, predict_image, to_tensor
from wsiseg.errors import WsisegError
from wsiseg.progress import get_logger

log = get_logger("infer")


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
    from wsiseg.engine.segment import check_backbone_weights
    from wsiseg.models.checkpoint import read_checkpoint, reconcile, segmenter_from

    payload = read_checkpoint(checkpoint)
    stored = reconcile(payload, config)
    check_backbone_weights(payload, stored, fix="pass --config with model.pfm_weights_path naming your copy (the "
                                                "run's config.yaml, edited)")
    return segmenter_from(payload, stored, str(device)), stored


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


def _window(size: int | None, model: Any, stored: dict[str, Any]) -> int:
    """The window side (or resized longer side): `size`, else the checkpoint's input size; a multiple of the patch."""
    window = int(size or stored["model"]["input_size"])
    if window % model.input_multiple:
        m = model.input_multiple
        raise WsisegError(f"--input_size {window} is not a multiple of {m} (patch size / stride of "
                          f"{stored['model']['name']}); use {max(m, window // m * m)}")
    return window


def _write_predictions(partial: Path, dataset: Any, names: list[str], labels_of: Callable[[np.ndarray], np.ndarray],
                       colors: list[tuple[int, int, int]], accumulator: Any, title: str) -> list[dict[str, Any]]:
    """The mask and overlay PNG of every image under `partial`; the images with masks update `accumulator`."""
    from PIL import Image

    from wsiseg.export.overlay import blend_overlay
    from wsiseg.progress import progress_bar

    (partial / "predictions_masks").mkdir(parents=True)
    (partial / "predictions_overlays").mkdir()
    per_image = []
    with progress_bar(len(names), title, unit="images") as advance:
        for index, name in enumerate(names):
            image, mask = dataset.load(index)
            labels = labels_of(image)
            save_label_png(labels, partial / "predictions_masks" / f"{name}.png", colors)
            overlay = blend_overlay(image, labels, colors, skip_label=0)
            Image.fromarray(overlay).save(partial / "predictions_overlays" / f"{name}.png")
            if mask is not None:
                cm = accumulator.update(labels, mask)
                per_image.append({"image": name, "pixels": int(cm.sum()), "correct": int(np.trace(cm))})
            advance(1)
    return per_image


def infer_images(config: str | Path | None, checkpoint: str | Path, input_json: str | Path, output_dir: str | Path,
                 inference: ImageInference | None = None, device: str = "auto", split: str = "test",
                 overwrite: bool = False, bootstrap: int = 0) -> dict[str, Any]:
    """Segment the images of one split of a dataset JSON; writes predictions_masks/ (class-index PNGs at
    each image's original size), predictions_overlays/ and, where masks exist, metrics.json.

    `inference` says how (default: windows of the checkpoint's input size, overlap 0.25, Gaussian blend).
    """
    from wsiseg.devices import resolve_device
    from wsiseg.engine.predictors import BatchRunner, SegmenterPredictor
    from wsiseg.metrics import MetricAccumulator, format_metrics
    from wsiseg.outputs import atomic_output
    from wsiseg.store.masks import default_colors
    from wsiseg.train.data import SegmentationDataset, split_entries

    inference = inference or ImageInference()
    torch_device = resolve_device(device)
    checkpoint = checkpoint_file(checkpoint)
    entries = split_entries(input_json, split, need_masks=False)
    names = _unique_names(entries)
    model, stored = _load_model(config, checkpoint, torch_device)
    class_names = list(model.class_names or stored["dataset"]["class_names"])
    inference = replace(inference, size=_window(inference.size, model, stored))
    colors = default_colors(len(class_names))
    predictor = SegmenterPredictor(model, class_names, colors, stored["system"]["precision"])
    runner = BatchRunner(predictor, inference.batch_size)

    def labels_of(image: np.ndarray) -> np.ndarray:
        scores = predict_image(to_tensor(image, torch_device), runner, inference, model.input_multiple)
        return scores.argmax(0).cpu().numpy().astype(np.int64)

    ignore_index = stored["dataset"]["ignore_index"]
    dataset = SegmentationDataset(entries, len(class_names), ignore_index)
    accumulator = MetricAccumulator(len(class_names), ignore_index, class_names, keep_per_image=bootstrap > 0)
    started = time.perf_counter()
    output_dir = Path(output_dir)
    with atomic_output(output_dir, overwrite=overwrite, resume=False) as partial:
        per_image = _write_predictions(partial, dataset, names, labels_of, colors, accumulator,
                                       f"infer ({inference.mode})")
        seconds = time.perf_counter() - started
        metrics = None
        if per_image:
            metrics = accumulator.compute(bootstrap=bootstrap)
            metrics.update({"images": len(per_image), "mode": inference.mode, "input_size": inference.size,
                            "overlap": inference.overlap, "blend": inference.blend, "checkpoint": str(checkpoint),
                            "split": split, "per_image": per_image})
            (partial / "metrics.json").write_text(json.dumps(metrics, indent=1))
            log.info("%s on %d images: %s", split, len(per_image),
                     format_metrics(metrics, ("mdice", "dice_no_bg", "miou", "pixel_acc")))
    return {"output_dir": str(output_dir), "images": len(entries), "with_masks": len(per_image), "metrics": metrics,
            "seconds": seconds, "images_per_s": len(entries) / max(seconds, 1e-9)}
