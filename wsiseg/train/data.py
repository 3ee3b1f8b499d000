"""The reference JSON data set: images and class-index masks, read without colour conversion."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.errors import WsisegError
from wsiseg.train.dataset_json import read_dataset_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def read_image(path: Path) -> np.ndarray:
    """An RGB image (H, W, 3) uint8; WsisegError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise WsisegError(f"cannot read image {path} ({error}); replace or remove it from the dataset JSON") from None


def read_mask(path: Path, num_classes: int, ignore_index: int) -> np.ndarray:
    """A class-index mask (H, W) int64 from a single-channel or palette image, never colour-converted.

    Palette PNGs give their indices; grey RGB images (all channels equal) give one channel;
    values other than 0..C-1 and `ignore_index` are an error naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode = image.mode
            array = np.asarray(image)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise WsisegError(f"cannot read mask {path} ({error}); replace or remove it from the dataset JSON") from None
    if array.ndim == 3:
        if mode in ("RGB", "RGBA") and all(np.array_equal(array[..., 0], array[..., c]) for c in (1, 2)):
            array = array[..., 0]
        else:
            raise WsisegError(f"mask {path} is a colour ({mode}) image; save masks as single-channel or palette "
                              "PNGs holding class indices 0..C-1")
    array = array.astype(np.int64)
    values = np.unique(array)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5])
        hint = " (a 0/255 binary mask? store it as 0/1)" if 255 in bad and num_classes == 2 else ""
        raise WsisegError(f"mask {path} holds values {shown} outside 0..{num_classes - 1} and ignore_index "
                          f"{ignore_index}{hint}; fix the mask or dataset.num_classes")
    return array


def split_entries(json_path: Path | str, split: str, need_masks: bool = True) -> list[dict[str, Path | None]]:
    """The (image, mask) paths of one split; WsisegError when it is empty or lacks needed masks."""
    json_path = Path(json_path)
    entries = read_dataset_json(json_path).entries(split)
    if not entries:
        raise WsisegError(f"split '{split}' of {json_path} is empty; add image_path/mask_path entries to it")
    if need_masks and any(entry["mask"] is None for entry in entries):
        raise WsisegError(f"some entries of split '{split}' in {json_path} have no mask_path; every "
                          f"{split} image needs a mask")
    return entries


class SegmentationDataset:
    """Images and masks of one split as tensors: image float (3, H, W) in [0, 1], mask int64 (H, W).

    `transform(image, mask) -> (image, mask)` runs on the tensors (training augmentation).
    """

    def __init__(self, entries: list[dict[str, Path | None]], num_classes: int, ignore_index: int = 255,
                 transform: Callable[[Any, Any], tuple[Any, Any]] | None = None, repeats: int = 1) -> None:
        self.entries = entries
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.entries) * self.repeats

    def name(self, index: int) -> str:
        """The image's file stem (predictions are named after it)."""
        return Path(self.entries[index % len(self.entries)]["image"]).stem

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The image (H, W, 3) uint8 and mask (H, W) int64 (None when the entry has none) of an entry."""
        entry = self.entries[index % len(self.entries)]
        image = read_image(entry["image"])
        if entry["mask"] is None:
            return image, None
        mask = read_mask(entry["mask"], self.num_classes, self.ignore_index)
        if mask.shape != image.shape[:2]:
            raise WsisegError(f"mask {entry['mask']} is {mask.shape[1]}x{mask.shape[0]} but image {entry['image']} "
                              f"is {image.shape[1]}x{image.shape[0]}; masks must match their images pixel for pixel")
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        image, mask = self.load(index)
        image_t = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255.0)
        mask_t = torch.from_numpy(mask) if mask is not None else torch.full(image.shape[:2], self.ignore_index)
        if self.transform is not None:
            image_t, mask_t = self.transform(image_t, mask_t)
        return {"image": image_t, "mask": mask_t, "index": index % len(self.entries)}
