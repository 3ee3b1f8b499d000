"""Label masks as GeoJSON: valid polygons with holes, one classification per class, in slide pixels.

The mask is traced in row bands (marching squares at level 0.5 of each class's binary mask),
each band overlapping its neighbours by one row and clipped half a pixel inside that row, so
the pieces of a region cut by a band seam meet exactly and dissolve into one polygon when the
class is united. Coordinates are level-0 pixels of the source slide (QuPath's convention):
mask pixel (col, row) at level L covers [col, col+1) x [row, row+1) scaled by the level's
MPP over the slide's base MPP, plus the slide's bounds origin.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.store.masks import MaskStore

MAX_TRACE_PIXELS = 25_000_000  # default level: the first one at most this large
BAND_ROWS = 1024


def choose_level(store: MaskStore, max_pixels: int = MAX_TRACE_PIXELS) -> int:
    """The finest pyramid level with at most `max_pixels` pixels."""
    for index in range(store.num_levels):
        height, width = store.level(index).shape
        if height * width <= max_pixels:
            return index
    return store.num_levels - 1


def _rings_to_polygons(rings: list[np.ndarray]) -> list[Any]:
    """Polygons from closed marching-squares rings (x, y): clockwise outer rings, counter-clockwise holes."""
    import shapely
    from shapely.geometry import Polygon

    outers, holes = [], []
    for ring in rings:
        if len(ring) < 4:
            continue
        polygon = Polygon(ring)
        if polygon.area == 0:
            continue
        (holes if shapely.is_ccw(polygon.exterior) else outers).append(polygon)
    if not outers:
        return []
    tree = shapely.STRtree(outers)
    assigned: list[list[Any]] = [[] for _ in outers]
    for hole in holes:
        candidates = [int(i) for i in tree.query(hole, predicate="within")]
        if candidates:
            smallest = min(candidates, key=lambda i: outers[i].area)
            assigned[smallest].append(hole.exterior.coords)
    return [Polygon(outer.exterior.coords, assigned[i]) for i, outer in enumerate(outers)]


def trace_band(binary: np.ndarray, y_offset: int, clip: tuple[float, float]) -> list[Any]:
    """Polygons (mask-pixel-corner coordinates) of a binary band whose first row is image row `y_offset`."""
    import shapely
    from shapely.geometry import box
    from skimage.measure import find_contours

    if not binary.any():
        return []
    padded = np.pad(binary.astype(np.float32), 1)
    rings = []
    for contour in find_contours(padded, 0.5, fully_connected="high", positive_orientation="high"):
        # (row, col) in the padded array, pixel centres at integers -> corner coordinates (x, y)
        ring = np.stack([contour[:, 1] - 1 + 0.5, contour[:, 0] - 1 + 0.5 + y_offset], axis=1)
        rings.append(ring)
    polygons = _rings_to_polygons(rings)
    window = box(-1.0, clip[0], binary.shape[1] + 1.0, clip[1])
    clipped = []
    for polygon in polygons:
        piece = shapely.intersection(shapely.make_valid(polygon), window)
        clipped.extend(_polygons_of(piece))
    return clipped


def _polygons_of(geometry: Any) -> list[Any]:
    """The polygons inside any geometry (dropping points and lines)."""
    if geometry.is_empty:
        return []
    if geometry.geom_type == "Polygon":
        return [geometry]
    if hasattr(geometry, "geoms"):
        return [p for g in geometry.geoms for p in _polygons_of(g)]
    return []


def class_polygons(
    labels: Any, class_index: int, band_rows: int = BAND_ROWS
) -> Any:
    """The region of one class in an (H, W) label array (numpy or zarr) as one (Multi)Polygon, seams dissolved."""
    import shapely

    height = labels.shape[0]
    pieces: list[Any] = []
    for y0 in range(0, height, band_rows):
        y1 = min(y0 + band_rows, height)
        top, bottom = max(y0 - 1, 0), min(y1 + 1, height)
        band = np.asarray(labels[top:bottom]) == class_index
        clip = (float(y0) if y0 > 0 else -1.0, float(y1) if y1 < height else height + 1.0)
        pieces.extend(trace_band(band, top, clip))
    if not pieces:
        return shapely.geometry.MultiPolygon()
    return shapely.make_valid(shapely.union_all(pieces))


def mask_to_features(
    store: MaskStore,
    level: int | None = None,
    simplify: float = 1.0,
    min_area: float = 0.0,
) -> list[dict[str, Any]]:
    """GeoJSON features (one per polygon) of every non-background class of a mask store.

    `simplify` is the tolerance in pixels of the traced level; `min_area` drops polygons
    smaller than that many traced-level pixels.
    """
    import shapely
    from shapely import affinity

    level = choose_level(store) if level is None else level
    labels = store.level(level)
    slide_mpp = store.slide_mpp or store.mpp
    scale = store.mpp * (store.width / labels.shape[1]) / slide_mpp
    origin_x, origin_y = store.origin
    features = []
    for index, name in enumerate(store.class_names):
        if index == store.background:
            continue
        region = class_polygons(labels, index)
        if simplify > 0:
            region = shapely.make_valid(region.simplify(simplify, preserve_topology=True))
        for polygon in _polygons_of(region):
            if polygon.area <= min_area:
                continue
            polygon = affinity.affine_transform(polygon, [scale, 0, 0, scale, origin_x, origin_y])
            polygon = shapely.geometry.polygon.orient(polygon, 1.0)
            features.append(
                {
                    "type": "Feature",
                    "geometry": shapely.geometry.mapping(polygon),
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": name, "color": list(store.colors[index])},
                        "label": index,
                    },
                }
            )
    return features


def write_geojson(store: MaskStore, path: Path, level: int | None = None, simplify: float = 1.0) -> Path:
    """Write the mask's class polygons as a GeoJSON FeatureCollection to `path`."""
    collection = {"type": "FeatureCollection", "features": mask_to_features(store, level, simplify)}
    path = Path(path)
    path.write_text(json.dumps(collection))
    return path
