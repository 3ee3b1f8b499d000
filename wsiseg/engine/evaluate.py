"""`wsiseg eval`: a mask store against annotations, with the trainer's metric suite.

Annotations are either
- a folder of annotated tiles: label PNGs, each with its place on the slide given by a
  sidecar `NAME.json` ({"x": .., "y": .., "mpp": ..}) or by one `tiles.json` listing
  [{"mask": "NAME.png", "x": .., "y": .., "mpp": ..}]; x, y are level-0 pixels of the slide
  (the coordinates of `wsiseg export --format geojson` and QuPath), mpp the PNG's resolution;
  pixels valued 255 are ignored;
- a GeoJSON of class polygons (QuPath's `classification.name`, or a `class` / `label`
  property) in the same coordinates; pixels outside every polygon are ignored.
Predictions are sampled (nearest) at the centre of every annotation pixel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.errors import WsisegError
from wsiseg.polygons import geometry_polygons, load_features
from wsiseg.slide.grid import Frame
from wsiseg.store.masks import MaskStore

IGNORE = 255
TILE_INDEX = "tiles.json"
MAX_RASTER_PIXELS = 25_000_000


def _inside(store: MaskStore, level: int, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Bool (len(rows), len(cols)): which of these mask-level pixels lie within the mask's extent."""
    height, width = store.level(level).shape
    return ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]


def _sample(store: MaskStore, level: int, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the mask level on the grid of float positions `xs` x `ys` (nearest), and where they lie on the mask."""
    cols, rows = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
    x0, y0 = int(cols.min()), int(rows.min())
    box = store.read(x0, y0, int(cols.max()) - x0 + 1, int(rows.max()) - y0 + 1, level)
    return box[np.ix_(rows - y0, cols - x0)], _inside(store, level, cols, rows)


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise WsisegError(f"{path} is not valid JSON ({error}): fix {what}") from None


def _tile_entries(folder: Path) -> list[dict[str, Any]]:
    index = folder / TILE_INDEX
    if index.is_file():
        entries = _load_json(index, 'it (a list of {"mask": "NAME.png", "x": .., "y": .., "mpp": ..})')
        if not isinstance(entries, list) or not all(isinstance(entry, dict) and "mask" in entry for entry in entries):
            raise WsisegError(f'{index} must be a list of entries that each name their PNG: add "mask": "NAME.png"')
        return [{**entry, "mask": folder / entry["mask"]} for entry in entries]
    entries = []
    for png in sorted(folder.glob("*.png")):
        sidecar = png.with_suffix(".json")
        if not sidecar.is_file():
            raise WsisegError(f"annotated tile {png.name} has no {sidecar.name} with its x, y and mpp: add one")
        place = _load_json(sidecar, 'it ({"x": .., "y": .., "mpp": ..})')
        if not isinstance(place, dict):
            raise WsisegError(f'{sidecar} must be an object {{"x": .., "y": .., "mpp": ..}}: fix it')
        entries.append({**place, "mask": png})
    if not entries:
        raise WsisegError(f"{folder} holds no annotated tiles: add PNG masks with NAME.json sidecars or a {TILE_INDEX}")
    return entries


def tile_pairs(store: MaskStore, folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prediction, annotation) label arrays of every annotated tile of a folder."""
    from PIL import Image

    mask = store.frame
    pairs = []
    for entry in _tile_entries(folder):
        missing = [key for key in ("x", "y", "mpp") if key not in entry]
        if missing:
            raise WsisegError(f"the entry of {Path(entry['mask']).name} lacks {', '.join(missing)}: add them")
        if not Path(entry["mask"]).is_file():
            raise WsisegError(f"annotated tile {entry['mask']} not found: fix its entry in {TILE_INDEX} or add the PNG")
        target = np.asarray(Image.open(entry["mask"]))
        if target.ndim != 2:
            raise WsisegError(f"{Path(entry['mask']).name} is not a single-channel label PNG: save labels as L or P mode")
        height, width = target.shape
        tile = Frame(width, height, float(entry["mpp"]), mask.slide_mpp, (float(entry["x"]), float(entry["y"])))
        # annotation pixel centre -> slide level-0 px -> mask px
        xs, ys = mask.from_slide(*tile.to_slide(np.arange(width) + 0.5, np.arange(height) + 0.5))
        prediction, inside = _sample(store, 0, xs, ys)
        pairs.append((prediction, np.where(inside, target, IGNORE).astype(np.uint8)))
    return pairs


def _feature_class(feature: dict[str, Any]) -> str | int | None:
    properties = feature.get("properties") or {}
    classification = properties.get("classification")
    if isinstance(classification, dict) and "name" in classification:
        return classification["name"]
    if isinstance(classification, str):
        return classification
    for key in ("class", "label", "name"):
        if key in properties:
            return properties[key]
    return None


def geojson_pair(store: MaskStore, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, annotation) over the bounding box of a GeoJSON's polygons, at a mask level that fits."""
    from skimage.draw import polygon as fill_polygon

    features = load_features(path, "fix the GeoJSON")
    lookup = {name.lower(): index for index, name in enumerate(store.class_names)}
    shapes = []
    for feature in features:
        name = _feature_class(feature)
        if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
            label = int(name)
            if label >= len(store.class_names):
                raise WsisegError(
                    f"annotation class {label} in {path.name} is not a class of the mask "
                    f"(0..{len(store.class_names) - 1}): fix the label or use a class name"
                )
        elif isinstance(name, str) and name.lower() in lookup:
            label = lookup[name.lower()]
        else:
            raise WsisegError(
                f"annotation class {name!r} in {path.name} is not a class of the mask "
                f"({', '.join(store.class_names)}): rename it"
            )
        shapes.extend((label, rings) for rings in geometry_polygons(feature))
    if not shapes:
        raise WsisegError(f"{path} holds no polygons: annotate class regions as polygons")
    points = np.concatenate([np.asarray(rings[0], dtype=np.float64) for _, rings in shapes])
    level = 0
    while True:
        frame = store.frame.level(level)
        x0, y0 = np.floor(frame.from_slide(*points.min(axis=0))).astype(int)
        x1, y1 = np.ceil(frame.from_slide(*points.max(axis=0))).astype(int)
        if (x1 - x0) * (y1 - y0) <= MAX_RASTER_PIXELS or level == store.num_levels - 1:
            break
        level += 1
    width, height = max(x1 - x0, 1), max(y1 - y0, 1)
    target = np.full((height, width), IGNORE, np.uint8)
    for label, rings in shapes:
        for index, ring in enumerate(rings):
            vertices = np.asarray(ring, dtype=np.float64)
            cols, rows = frame.from_slide(vertices[:, 0], vertices[:, 1])
            # pixel (r, c) is inside when its centre (c + 0.5, r + 0.5) is
            rr, cc = fill_polygon(rows - y0 - 0.5, cols - x0 - 0.5, shape=target.shape)
            target[rr, cc] = label if index == 0 else IGNORE
    prediction = store.read(int(x0), int(y0), width, height, level)
    inside = _inside(store, level, np.arange(x0, x0 + width), np.arange(y0, y0 + height))
    target[~inside] = IGNORE
    return prediction, target


def evaluate_mask(mask: Path | str, annotations: Path | str) -> dict[str, Any]:
    """Metrics of a mask.zarr against a folder of annotated tiles or a GeoJSON of class polygons."""
    from wsiseg.export.mask import open_complete
    from wsiseg.metrics import confusion_matrix, metrics_from_confusion

    store = open_complete(Path(mask))
    annotations = Path(annotations)
    if annotations.is_dir():
        pairs = tile_pairs(store, annotations)
    elif annotations.is_file():
        pairs = [geojson_pair(store, annotations)]
    else:
        raise WsisegError(f"annotations {annotations} not found: give a folder of annotated tiles or a GeoJSON file")
    num_classes = len(store.class_names)
    total = np.zeros((num_classes, num_classes), np.int64)
    for prediction, target in pairs:
        try:
            total += confusion_matrix(prediction, target, num_classes, ignore_index=IGNORE)
        except ValueError as error:
            raise WsisegError(f"annotations {annotations.name}: {error}; labels must be 0..{num_classes - 1} or 255") from None
    if total.sum() == 0:
        raise WsisegError(f"no annotated pixel of {annotations.name} falls on the mask: check the coordinates and MPP")
    metrics = metrics_from_confusion(total, background_index=store.background)
    return {
        "mask": str(mask), "annotations": str(annotations), "class_names": store.class_names,
        "regions": len(pairs), "confusion": total.tolist(), "metrics": metrics,
    }
