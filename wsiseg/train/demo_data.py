"""The built-in labelled demo data set: the real hgsc_nest H&E image cut into train/val/test tiles.

The 1500x1500 image and its nuclei-type mask (0 background, 1 connective, 2 inflammatory,
3 neoplastic; model-made labels, fine for a demo, not a benchmark) are cut into a 5x5 grid of
300 px tiles: the top four rows give 16 training and 4 validation tiles, the bottom row is cut
into three 500x300 test tiles (non-square, to exercise any-size inference). Masks are written
as palette PNGs holding the class indices.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from wsiseg.errors import WsisegError
from wsiseg.outputs import temporary_sibling

CLASS_NAMES = ["background", "connective", "inflammatory", "neoplastic"]
PALETTE = [(0, 0, 0), (0, 160, 0), (230, 200, 0), (220, 30, 30)]
TILE = 300
VAL_TILES = {(0, 2), (1, 4), (2, 1), (3, 3)}


def _save_mask(mask: np.ndarray, path: Path) -> None:
    from PIL import Image

    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [value for colour in PALETTE for value in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))
    image.save(path)


def prepare_demo_dataset(out_dir: Path | str) -> Path:
    """Write the demo tiles and their reference JSON under `out_dir`; returns the JSON path.

    Idempotent: an existing complete data set is reused. The folder is built under a temporary
    name unique to this process and renamed into place whole, so parallel processes never rewrite
    files that another one is reading.
    """
    out_dir = Path(out_dir)
    json_path = out_dir / "dataset.json"
    if json_path.is_file():
        return json_path
    temporary = temporary_sibling(out_dir)
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        _write_dataset(temporary)
        try:
            temporary.rename(out_dir)
        except OSError:
            if not json_path.is_file():  # else another process put its complete copy in place first
                raise WsisegError(f"{out_dir} exists but holds no dataset.json; remove that folder and retry") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return json_path


def _write_dataset(out_dir: Path) -> None:
    """The tiles, masks and dataset.json, written into a fresh folder."""
    from PIL import Image

    from wsiseg.samples import fetch_samples

    samples = fetch_samples()
    image = np.asarray(Image.open(samples["hgsc_image"]).convert("RGB"))
    mask = np.asarray(Image.open(samples["hgsc_mask"]))
    if image.shape[:2] != mask.shape or image.shape[:2] != (5 * TILE, 5 * TILE):
        raise WsisegError(f"the hgsc sample has an unexpected size {image.shape[:2]}; clear the sample cache and retry")
    for sub in ("images", "masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}

    def write(name: str, split: str, y: int, x: int, h: int, w: int) -> None:
        Image.fromarray(image[y : y + h, x : x + w]).save(out_dir / "images" / f"{name}.png")
        _save_mask(mask[y : y + h, x : x + w], out_dir / "masks" / f"{name}.png")
        splits[split].append({"image_path": f"images/{name}.png", "mask_path": f"masks/{name}.png"})

    for row in range(4):
        for col in range(5):
            split = "val" if (row, col) in VAL_TILES else "train"
            write(f"hgsc_r{row}_c{col}", split, row * TILE, col * TILE, TILE, TILE)
    for part in range(3):
        write(f"hgsc_test_{part}", "test", 4 * TILE, part * 500, TILE, 500)
    document = {"num_classes": len(CLASS_NAMES), "class_names": CLASS_NAMES, **splits}
    (out_dir / "dataset.json").write_text(json.dumps(document, indent=1))


def demo_dataset_json() -> Path:
    """The demo data set's JSON in the sample cache, prepared on first use."""
    from wsiseg.samples import cache_dir

    return prepare_demo_dataset(cache_dir() / "demo_hgsc")
