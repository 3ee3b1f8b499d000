"""Label masks as GeoJSON that QuPath imports as the mask: one polygon coverage of all classes, in slide pixels.

Tracing: the pixel edges of the traced pyramid level between different labels are cut into
maximal straight runs wherever the pair of labels on their two sides changes, merged into lines
between junctions (`wsiseg.export.line_merge`: the very lines GEOS's line merger makes, in its order),
and polygonized.
The faces are exactly the regions of one label (a face's area is its pixel count), and
neighbouring faces share their edges vertex for vertex: together they form a polygon coverage.
Regions under `min_area` are first relabelled, in the raster, as the neighbour they share the
longest edge with; the coverage is simplified as a whole (shapely's `coverage_simplify`), so boundaries stay shared:
no overlaps and no gaps between classes. The background faces take part and are left out of the
file.

The file is written a run of features at a time, its numbers formatted in numpy as json.dumps
would write them (`wsiseg.export.geojson_text`). Coordinates are level-0 pixels of the source
slide (QuPath's convention): pixel (c, r) of pyramid level L covers mask pixels [c 2^L, (c + 1) 2^L) x [r 2^L, (r + 1) 2^L), which map to the
slide by the mask MPP over the slide's base MPP, plus the slide's bounds origin.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.errors import WsisegError
from wsiseg.export.geojson_text import COORDINATE_DECIMALS, coordinate_texts
from wsiseg.export.line_merge import merged_lines
from wsiseg.store.masks import MaskStore

MAX_TRACE_PIXELS = 25_000_000  # default level: the finest one at most this large
BAND_ROWS = 1024
OUTSIDE = -1  # the label beyond the mask's edges
VERTICES_PER_WRITE = 50_000  # coordinates formatted as text at a time (a larger polygon goes alone)


def choose_level(store: MaskStore, max_pixels: int = MAX_TRACE_PIXELS) -> int:
    """The finest pyramid level with at most `max_pixels` pixels."""
    for index in range(store.num_levels):
        height, width = store.level(index).shape
        if height * width <= max_pixels:
            return index
    return store.num_levels - 1


def _edge_runs(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(line, start, stop) of the maximal runs along axis 1 where `first` != `second` with one label pair."""
    edge = first != second
    continues = np.zeros_like(edge)  # the edge at i continues the one at i - 1
    continues[:, 1:] = edge[:, 1:] & edge[:, :-1] & (first[:, 1:] == first[:, :-1]) & (second[:, 1:] == second[:, :-1])
    starts = edge & ~continues
    stops = edge  # reused in place
    stops[:, :-1] &= ~continues[:, 1:]
    lines, start = np.nonzero(starts)
    _, stop = np.nonzero(stops)
    return lines, start, stop + 1


def _segments(labels: Any, band_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, stop, vertical): the pixel-edge segments between different labels of an (H, W) array, read in row bands.

    `start` and `stop` are (n, 2) integer corners (x, y), `stop` after `start` along the
    segment's axis; vertical segments are cut at the bands' seams.
    """
    height, width = labels.shape
    starts, stops, vertical = [], [], []
    for y0 in range(0, height, band_rows):
        y1 = min(y0 + band_rows, height)
        # rows y0 - 1 .. y1, OUTSIDE beyond the mask
        band = np.full((y1 - y0 + 2, width + 2), OUTSIDE, np.int32)
        band[1:-1, 1:-1] = np.asarray(labels[y0:y1])
        if y0 > 0:
            band[0, 1:-1] = np.asarray(labels[y0 - 1])
        # horizontal edges at y = y0 .. y1 - 1 (y1 too on the last band), between rows above and below
        last = 1 if y1 == height else 0
        rows = slice(0, y1 - y0 + last)
        line, start, stop = _edge_runs(band[:-1, 1:-1][rows], band[1:, 1:-1][rows])
        starts.append(np.stack([start, line + y0], 1))
        stops.append(np.stack([stop, line + y0], 1))
        vertical.append(np.zeros(len(line), bool))
        # vertical edges at x = 0 .. width of the band's own rows
        line, start, stop = _edge_runs(band[1:-1, :-1].T, band[1:-1, 1:].T)
        starts.append(np.stack([line, start + y0], 1))
        stops.append(np.stack([line, stop + y0], 1))
        vertical.append(np.ones(len(line), bool))
    return np.concatenate(starts), np.concatenate(stops), np.concatenate(vertical)


def coverage_faces(labels: Any, band_rows: int = BAND_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(polygons, labels): the regions of equal label of an (H, W) array (numpy or zarr) as a polygon coverage.

    Coordinates are pixel corners of the array; every face's area is its pixel count.
    """
    import shapely

    # merged into lines between junctions first, polygonizing is faster (10.8 -> 8.7-9.9 s on 9 Mpx, 20k nuclei)
    faces = shapely.get_parts(shapely.polygonize(merged_lines(*_segments(labels, band_rows))))
    inside = shapely.get_coordinates(shapely.point_on_surface(faces))
    rows, cols = np.floor(inside[:, 1]).astype(np.int64), np.floor(inside[:, 0]).astype(np.int64)
    values = np.empty(len(faces), np.int64)
    for y0 in range(0, labels.shape[0], band_rows):
        here = (rows >= y0) & (rows < y0 + band_rows)
        if here.any():
            values[here] = np.asarray(labels[y0 : y0 + band_rows])[rows[here] - y0, cols[here]]
    return faces, values


def _regions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(regions, region_label): the 4-connected regions of equal label, numbered from 1, and each one's label."""
    from skimage.measure import label as connected_regions

    regions = connected_regions(labels.astype(np.int32), background=-1, connectivity=1)  # no value is background
    region_label = np.zeros(int(regions.max()) + 1, labels.dtype)
    region_label[regions] = labels
    return regions, region_label


def _shared_edges(regions: np.ndarray, region_label: np.ndarray, small: np.ndarray, num_labels: int) -> np.ndarray:
    """(2, small regions, labels): pixel edges each small region shares with each label, and with its large regions."""
    row = np.cumsum(small) - 1  # each small region's row
    size = int(small.sum()) * num_labels
    shared = np.zeros((2, size), np.int64)
    for a, b in ((regions[:, :-1], regions[:, 1:]), (regions[:-1], regions[1:])):
        differ = a != b
        first, second = a[differ], b[differ]
        for own, other in ((first, second), (second, first)):
            mine = small[own]
            own, other = own[mine], other[mine]
            cell = row[own] * num_labels + region_label[other]
            shared[0] += np.bincount(cell, minlength=size)
            shared[1] += np.bincount(cell[~small[other]], minlength=size)
    return shared.reshape(2, -1, num_labels)


def _absorb_pass(labels: np.ndarray, min_pixels: float, num_labels: int) -> np.ndarray | None:
    """`labels` with each region under `min_pixels` relabelled once (see `absorb_small_regions`); None if none is."""
    regions, region_label = _regions(labels)
    small = np.bincount(regions.reshape(-1)) < min_pixels
    small[0] = False  # no region has id 0
    if not small.any():
        return None
    shared, shared_large = _shared_edges(regions, region_label, small, num_labels)
    counts = np.where(shared_large.sum(axis=1, keepdims=True) > 0, shared_large, shared)
    relabel = counts.sum(axis=1) > 0
    region_label[np.flatnonzero(small)[relabel]] = counts[relabel].argmax(axis=1)
    return region_label[regions]


def absorb_small_regions(labels: np.ndarray, min_pixels: float, passes: int = 4) -> np.ndarray:
    """`labels` with every 4-connected region under `min_pixels` relabelled as the neighbour it shares most edges with.

    Neighbours that are large enough are preferred; a few passes settle regions whose
    neighbours were small too. A region with no neighbour (the whole image) stays.
    """
    labels = np.asarray(labels)
    num_labels = int(labels.max()) + 1
    for _ in range(passes):
        absorbed = _absorb_pass(labels, min_pixels, num_labels)
        if absorbed is None:
            break
        labels = absorbed
    return labels


def class_faces(
    store: MaskStore,
    level: int | None = None,
    simplify: float = 0.0,
    min_area: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(polygons, labels, areas in µm²) of every non-background region of a mask store, in slide pixels.

    `level`: the pyramid level traced (default: the finest of at most 25 Mpx); `simplify`: the
    coverage simplification tolerance in µm (0 = off: the polygons follow the pixel edges and
    every class area equals its pixel count; from about one traced pixel on, the staircases
    go, about half the vertices with them, and regions a few pixels across change area by
    5-14%); `min_area`: regions smaller than this many µm² are merged into their neighbour.
    Exterior rings run counter-clockwise (RFC 7946).
    """
    import shapely

    level = choose_level(store) if level is None else level
    if not 0 <= level < store.num_levels:
        raise WsisegError(f"--level {level} is not a level of {store.path.name}: use 0..{store.num_levels - 1}")
    if simplify < 0 or min_area < 0:
        raise WsisegError("--simplify and --min-area must be 0 or more")
    frame = store.frame.level(level)
    pixel_um = frame.mpp
    raster = store.level(level)
    if min_area > 0:
        raster = absorb_small_regions(raster[...], min_area / pixel_um**2)
    faces, labels = coverage_faces(raster)
    if simplify > 0 and len(faces):
        faces = shapely.coverage_simplify(faces, simplify / pixel_um, simplify_boundary=False)
    keep = labels != store.background
    faces, labels = faces[keep], labels[keep]
    areas_um2 = shapely.area(faces) * pixel_um**2
    faces = shapely.transform(faces, lambda xy: np.round(np.stack(frame.to_slide(xy[:, 0], xy[:, 1]), axis=1),
                                                         COORDINATE_DECIMALS))
    return shapely.orient_polygons(faces), labels, areas_um2


def _feature_texts(store: MaskStore, polygons: np.ndarray, labels: np.ndarray, areas: np.ndarray) -> Iterator[str]:
    """Each feature's GeoJSON text, as json.dumps writes it, formatted about VERTICES_PER_WRITE vertices at a time."""
    import shapely

    properties = [
        json.dumps({"objectType": "annotation", "classification": {"name": name, "color": list(color)},
                    "measurements": {"Area µm^2": 0.0}}, ensure_ascii=False)[: -len("0.0}}")]
        for name, color in zip(store.class_names, store.colors)
    ]
    head = '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
    counts = shapely.get_num_coordinates(polygons)
    firsts = np.flatnonzero(np.diff((np.cumsum(counts) - counts) // VERTICES_PER_WRITE, prepend=-1)).tolist()
    for begin, end in zip(firsts, [*firsts[1:], len(polygons)]):
        run = slice(begin, end)
        texts = coordinate_texts(polygons[run])
        for coordinates, label, area in zip(texts, labels[run].tolist(), areas[run].tolist()):
            yield f"{head}{coordinates}}}, \"properties\": {properties[label]}{round(area, 3)!r}}}}}}}"


def write_geojson(
    store: MaskStore, path: Path, level: int | None = None, simplify: float = 0.0, min_area: float = 0.0
) -> Path:
    """Write the mask's class polygons as a GeoJSON FeatureCollection to `path` (see `class_faces`).

    The features are written as they are formatted, a run at a time: the text of the whole file is never held.
    """
    polygons, labels, areas = class_faces(store, level, simplify, min_area)
    path = Path(path)
    with path.open("w") as out:
        out.write('{"type": "FeatureCollection", "features": [')
        for index, text in enumerate(_feature_texts(store, polygons, labels, areas)):
            out.write(f", {text}" if index else text)
        out.write("]}")
    return path
