"""The dataset JSON, read once for training, validation, inference and the config checks.

Two layouts are accepted, holding the same lists:
- the reference's: `{"num_classes": N, "data": {"train": [...], "val": [...], "test": [...]}}`;
- the flat one: `{"num_classes": N, "class_names": [...], "train": [...], "val": [...], "test": [...]}`.

Items are `{"image_path", "mask_path"}`; a `mask_path` that is null or missing means "no mask"
(allowed in `test`: the image is predicted and left out of the metrics). Relative paths are
resolved against the JSON's folder, falling back to the current folder when only it holds the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsiseg.errors import WsisegError

SPLITS = ("train", "val", "test")
NOT_SPLITS = ("class_names", "classes")
Entry = dict[str, Path | None]


def resolve_path(value: str, base_dir: Path) -> Path:
    """A relative path against `base_dir`, or against the current folder when only it holds the file."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    beside = (base_dir / path).resolve()
    if beside.exists() or not path.exists():
        return beside
    return path.resolve()


@dataclass(frozen=True)
class DatasetIndex:
    """A parsed dataset JSON: its class count and names (when given) and each split's entries."""

    path: Path
    layout: str
    num_classes: int | None = None
    class_names: list[str] | None = None
    splits: dict[str, list[Entry]] = field(default_factory=dict)

    def entries(self, split: str) -> list[Entry]:
        """The {"image", "mask"} paths of `split` (empty when the JSON has no such list)."""
        return self.splits.get(split, [])


def _entries(items: Any, split: str, path: Path) -> list[Entry]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise WsisegError(f"split '{split}' of {path} must be a list of {{image_path, mask_path}} objects")
    out = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image_path"), str):
            raise WsisegError(f"entry {index} of split '{split}' in {path} needs an 'image_path' (and 'mask_path')")
        mask = item.get("mask_path")
        if mask is not None and not isinstance(mask, str):
            raise WsisegError(f"entry {index} of split '{split}' in {path}: mask_path must be a path or null")
        out.append({"image": resolve_path(item["image_path"], path.parent),
                    "mask": resolve_path(mask, path.parent) if mask else None})
    return out


def read_dataset_json(path: Path | str) -> DatasetIndex:
    """Parse a dataset JSON of either layout; WsisegError naming the file and the fix when it is malformed."""
    path = Path(path)
    if not path.is_file():
        raise WsisegError(f"dataset JSON {path} does not exist; point dataset.json (json_file) at the JSON with "
                          "train/val/test lists of image_path/mask_path")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WsisegError(f"dataset JSON {path} is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise WsisegError(f"dataset JSON {path} must hold an object with train/val/test lists")
    if "data" in document:
        lists = document["data"]
        if not isinstance(lists, dict):
            raise WsisegError(f"\"data\" in {path} must be an object with train/val/test lists")
        flat = [split for split in SPLITS if split in document]
        if flat:
            raise WsisegError(f"{path} has both \"data\" and top-level {', '.join(flat)} lists; keep one layout")
        layout = "reference"
    else:
        lists, layout = document, "flat"
    num_classes = document.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise WsisegError(f"num_classes in {path} must be a positive integer, got {num_classes!r}")
    names = document.get("class_names", document.get("classes"))
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise WsisegError(f"class_names in {path} must be a list of strings")
    named = [key for key, value in lists.items() if isinstance(value, list) and key not in NOT_SPLITS]
    splits = {split: _entries(lists[split], split, path) for split in named}
    return DatasetIndex(path, layout, num_classes, names, splits)
