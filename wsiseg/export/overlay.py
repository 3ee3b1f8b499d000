"""overlay.png: a thumbnail of the slide with the classes painted over it and a legend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.progress import get_logger
from wsiseg.store.masks import MaskStore

log = get_logger("overlay")

OVERLAY_MAX_SIDE = 2048
ALPHA = 0.45
BLEND_ROWS = 128  # rows blended at a time


def overview_level(store: MaskStore, max_side: int = OVERLAY_MAX_SIDE) -> int:
    """The finest pyramid level whose longer side is at most `max_side`."""
    for index in range(store.num_levels):
        if max(store.level(index).shape) <= max_side:
            return index
    return store.num_levels - 1


def source_picture(reader: Any, max_side: int = OVERLAY_MAX_SIDE) -> np.ndarray:
    """The RGB overview an overlay is painted on, of a Slide or a TileStore.

    A tile store shows its source slide when that is still there unchanged in size (so a store run
    gives the overlay of the slide run), else its own pixels (white where no tile was stored).
    """
    from wsiseg.store.tiles import TileStore

    if not isinstance(reader, TileStore):
        return reader.thumbnail(max_side)
    source = reader.source_slide()
    if source is not None:
        with source:
            return source.thumbnail(max_side)
    log.info("overlay of %s from its own tiles (its slide %s is not there)", reader.path.name, reader.source)
    return reader.thumbnail(max_side)


def colorize(labels: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image of a label array."""
    table = np.zeros((max(len(colors), int(labels.max()) + 1), 3), dtype=np.uint8)
    table[: len(colors)] = np.asarray([c[:3] for c in colors], dtype=np.uint8)
    return table[labels]


def blend_overlay(
    background_rgb: np.ndarray | None, labels: np.ndarray, colors: Sequence[Sequence[int]], skip_label: int
) -> np.ndarray:
    """Paint labels over an RGB image (white where none), leaving `skip_label` pixels unpainted.

    Blended in blocks of rows, so the float temporaries stay a few MB whatever the image size.
    """
    out = np.empty((*labels.shape, 3), dtype=np.uint8)
    opacity = ALPHA if background_rgb is not None else 1.0
    for y in range(0, labels.shape[0], BLEND_ROWS):
        rows = labels[y : y + BLEND_ROWS]
        painted = colorize(rows, colors).astype(np.float32)
        base = (
            np.full(painted.shape, 255, dtype=np.float32)
            if background_rgb is None
            else background_rgb[y : y + BLEND_ROWS, :, :3].astype(np.float32)
        )
        alpha = np.where(rows == skip_label, 0.0, opacity)[..., None]
        out[y : y + BLEND_ROWS] = np.round(base * (1 - alpha) + painted * alpha)
    return out


def add_legend(
    image: np.ndarray, class_names: Sequence[str], colors: Sequence[Sequence[int]], areas_mm2: dict[str, float] | None
) -> np.ndarray:
    """The image with a legend strip (colour box, class name, area) on its right."""
    from PIL import Image, ImageDraw, ImageFont

    font_size = max(12, min(24, image.shape[0] // 30))
    font = ImageFont.load_default(size=font_size)
    lines = [
        f"{name}" + (f"  {areas_mm2[name]:.3f} mm2" if areas_mm2 and name in areas_mm2 else "")
        for name in class_names
    ]
    row = font_size + 8
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(probe.textlength(line, font=font)) for line in lines) if lines else 0
    legend_width = text_width + row + 24
    height = max(image.shape[0], row * len(lines) + 16)
    canvas = Image.new("RGB", (image.shape[1] + legend_width, height), "white")
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = image.shape[1] + 8
    for index, (line, color) in enumerate(zip(lines, colors)):
        y = 8 + index * row
        draw.rectangle([x0, y, x0 + font_size, y + font_size], fill=tuple(int(v) for v in color[:3]), outline="black")
        draw.text((x0 + font_size + 8, y), line, fill="black", font=font)
    return np.asarray(canvas)


def write_overlay(store: MaskStore, path: Path, slide_thumbnail: np.ndarray | None = None) -> Path:
    """Write overlay.png of a mask store, over `slide_thumbnail` (any size, resized) when given."""
    from PIL import Image

    labels = np.asarray(store.level(overview_level(store))[:])
    background = None
    if slide_thumbnail is not None:
        background = np.asarray(
            Image.fromarray(slide_thumbnail[..., :3]).resize((labels.shape[1], labels.shape[0]), Image.BILINEAR)
        )
    image = blend_overlay(background, labels, store.colors, store.background)
    image = add_legend(image, store.class_names, store.colors, store.class_areas_mm2())
    path = Path(path)
    Image.fromarray(image).save(path, format="PNG")
    return path
