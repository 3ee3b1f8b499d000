"""Tiny real labelled data sets and configs for the training, inference and config tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

CLASS_NAMES = ["background", "connective", "inflammatory", "neoplastic"]


def make_dataset(root: Path, samples: dict[str, Path], size: int = 64, counts: tuple[int, int, int] = (3, 2, 2),
                 test_shape: tuple[int, int] = (48, 80)) -> Path:
    """Cut small tiles of the real hgsc image and nuclei-type mask into train/val/test; returns the JSON path.

    Masks are palette PNGs; test tiles are `test_shape` (h, w), non-square on purpose.
    """
    image = np.asarray(Image.open(samples["hgsc_image"]).convert("RGB"))
    mask = np.asarray(Image.open(samples["hgsc_mask"]))
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {"train": [], "val": [], "test": []}
    origin = 0
    for split, count in zip(("train", "val", "test"), counts):
        for index in range(count):
            h, w = (size, size) if split != "test" else test_shape
            y, x = 300 + origin, 200 + origin
            origin += size
            name = f"{split}_{index}"
            Image.fromarray(image[y : y + h, x : x + w]).save(root / "images" / f"{name}.png")
            tile = Image.fromarray(mask[y : y + h, x : x + w].astype(np.uint8), mode="P")
            tile.putpalette([0, 0, 0, 0, 200, 0, 230, 200, 0, 220, 30, 30] + [0] * 756)
            tile.save(root / "masks" / f"{name}.png")
            document[split].append({"image_path": f"images/{name}.png", "mask_path": f"masks/{name}.png"})
    path = root / "dataset.json"
    path.write_text(json.dumps(document))
    return path


def make_config(root: Path, json_path: Path, backbone: str = "efficientnet_lite0_imagenet", **sections: dict) -> Path:
    """A small training config (CPU, fp32, tiny crops) written to root/config.yaml, with section overrides."""
    config: dict[str, dict[str, Any]] = {
        "dataset": {"json": str(json_path), "num_classes": 4, "class_names": CLASS_NAMES},
        "system": {"device": "cpu", "num_workers": 0, "seed": 7, "precision": "fp32"},
        "model": {"name": backbone, "finetune_mode": "full", "input_size": 64},
        "training": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "warmup_epochs": 0.5, "crop_size": 64,
                     "loss": {"cross_entropy": 1.0, "dice": 0.5},
                     "augmentations": {"hflip": 0.5, "rotate90": 0.5, "color_jitter": 0.3}},
        "validation": {"batch_size": 4, "overlap": 0.25},
        "logging": {"output_dir": str(root / "run"), "log_every": 1},
        "visualization": {"num_samples": 1},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_tiny(root: Path, samples: dict[str, Path], epochs: int = 1, **sections: dict) -> dict[str, Any]:
    """Train the tiny config for `epochs` on the tiny data set; returns the run summary (with the config path)."""
    from wsiseg.train.trainer import train_model

    json_path = make_dataset(root / "data", samples)
    training = {"epochs": epochs, **sections.pop("training", {})}
    config = make_config(root, json_path, training=training, **sections)
    summary = train_model(config)
    summary["config"] = config
    summary["json"] = json_path
    return summary


def make_reference_dataset(root: Path, samples: dict[str, Path], size: int = 64) -> Path:
    """The tiny data set in the reference layout `{"num_classes", "data": {...}}`, with a second test
    item that has no mask_path (it must be predicted and left out of the metrics)."""
    flat = make_dataset(root, samples, size=size, counts=(3, 2, 2))
    document = json.loads(flat.read_text())
    del document["test"][1]["mask_path"]
    path = root / "reference.json"
    path.write_text(json.dumps({"num_classes": 4, "data": document}))
    return path


def random_lunit_weights(path: Path) -> Path:
    """A random-weights state dict of lunit_vits8's architecture, written by timm (as users' files are)."""
    import timm
    import torch

    torch.manual_seed(0)
    torch.save(timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0).state_dict(), path)
    return path


def reference_config(json_path: Path, weights: Path, log_dir: Path, size: int = 64) -> dict[str, Any]:
    """The reference's example config (its own keys and layout), scaled down to a CPU test."""
    return {
        "dataset": {"json_file": str(json_path), "num_classes": 4, "ignore_index": 255},
        "system": {"num_workers": 0, "pin_memory": False, "seed": 42, "device": "cpu"},
        "model": {"pfm_name": "lunit_vits8", "emb_dim": 384, "pfm_weights_path": str(weights),
                  "finetune_mode": {"type": "lora", "rank": 4, "alpha": 1.0}, "num_classes": 4},
        "training": {"batch_size": 2, "epochs": 1, "learning_rate": 0.001, "weight_decay": 0.0001,
                     "use_amp": True, "accumulate_grad_batches": 1, "clip_grad_norm": 5.0,
                     "augmentation": {"RandomResizedCropSize": size},
                     "optimizer": {"type": "SGD", "momentum": 0.9, "nesterov": True},
                     "scheduler": {"type": "cosine", "warmup_epochs": 1},
                     "loss": {"type": "dice"}},
        "validation": {"eval_interval": 1, "batch_size": 4, "augmentation": {"ResizedSize": size}},
        "logging": {"log_dir": str(log_dir), "experiment_name": "pfm_segmentation"},
        "visualization": {"save_interval": 1, "num_vis_samples": 1},
    }


def save_tiny_vit(path: Path, class_names: list[str], mpp: float) -> Path:
    """A tiny ViT segmenter (timm's test_vit, random weights, seed 0) saved as a wsiseg checkpoint for `mpp`."""
    import torch

    from wsiseg.models.checkpoint import save_checkpoint
    from wsiseg.models.segmenter import build_segmenter

    torch.manual_seed(0)
    config = {
        "dataset": {"json": "unused.json", "num_classes": len(class_names), "class_names": class_names, "mpp": mpp},
        "model": {"name": "timm:test_vit", "finetune_mode": "full", "input_size": 64},
    }
    save_checkpoint(path, build_segmenter(config["model"], len(class_names)), config, class_names)
    return path
