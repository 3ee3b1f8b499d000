"""Tissue masks: detection on a thumbnail (saturation + Otsu), user masks (PNG, GeoJSON), QC pictures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import color, draw, filters, morphology, segmentation

from wsiseg.errors import WsisegError
from wsiseg.outputs import atomic_file
from wsiseg.polygons import geometry_polygons, load_features
from wsiseg.slide.grid import Frame, snap
from wsiseg.slide.mask import TissueMask, check_tissue_option
from wsiseg.slide.reader import Slide

__all__ = [
    "TissueMask", "TissueSettings", "check_tissue_option", "detect_tissue", "load_mask", "qc_picture", "resolve_tissue",
    "save_png", "tissue_mask",
]

# Tissue is detected at MASK_MPP, finer for small images (so the mask has at least MASK_MIN_SIDE pixels
# along its longer side, never finer than the image) and coarser for very large ones (at most MASK_MAX_SIDE).
MASK_MPP = 2.0
MASK_MIN_SIDE = 1024
MASK_MAX_SIDE = 4096
COUNT_ROWS = 256  # rows of a label image counted at a time

# Glass is bright and nearly colourless (saturation about 0.01-0.03 on the CMU scan); even pale stroma has
# a saturation above 0.15. Otsu's threshold splits glass from tissue when both are present, but on an
# all-tissue image it splits pale from dark tissue, so the threshold used is kept in this range.
MIN_SATURATION = 0.05
MAX_SATURATION = 0.12
# Small fragments are kept when they hold nuclei: pixels whose haematoxylin optical density (colour
# deconvolution) exceeds NUCLEUS_DENSITY, over at least NUCLEI_UM2 (one or two nuclei).
NUCLEUS_DENSITY = 0.05
NUCLEI_UM2 = 30.0
# Minimum areas never exceed these shares of the image, so patches and small ROIs keep their tissue.
MIN_AREA_IMAGE_SHARE = 0.01
GAP_IMAGE_SHARE = 0.1


@dataclass(frozen=True)
class TissueSettings:
    """What `auto` detection does, with sizes in micrometres so they mean the same at any resolution.

    `threshold` (saturation, 0-1) replaces the automatic one. Pieces of at least `min_area_um2` are
    tissue; smaller ones of at least `min_fragment_um2` are kept when they hold nuclei. Background
    enclosed by tissue is filled, and so is background touching the image edge when smaller than
    `max_gap_um2` (a lumen cut by the edge of a crop is tissue, as it would be in the whole slide).
    """

    threshold: float | None = None
    closing_um: float = 8.0
    min_area_um2: float = 2_000.0
    min_fragment_um2: float = 150.0
    max_gap_um2: float = 20_000.0
    fill_holes: bool = True


def auto_threshold(saturation: np.ndarray) -> float:
    """Otsu's threshold of a saturation image, kept within [MIN_SATURATION, MAX_SATURATION]."""
    spread = float(saturation.max() - saturation.min()) if saturation.size else 0.0
    otsu = float(filters.threshold_otsu(saturation)) if spread > 1e-6 else 1.0
    return min(max(otsu, MIN_SATURATION), MAX_SATURATION)


def detect_tissue(thumbnail_rgb: np.ndarray, mpp: float, settings: TissueSettings | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB image on white background whose pixels are `mpp` micrometres wide.

    Tissue is saturated (HSV saturation above `auto_threshold`, or the given threshold); a closing
    joins what a few micrometres separate; pieces smaller than the minimum area are dropped unless
    they hold nuclei; enclosed background and small gaps at the image edge are filled. Minimum areas
    are capped at a share of the image, so an image without background is all tissue.
    """
    settings = settings or TissueSettings()
    rgb = np.asarray(thumbnail_rgb)[..., :3]
    pixel_um2 = mpp * mpp
    image_um2 = rgb.shape[0] * rgb.shape[1] * pixel_um2
    saturation = _smoothed_saturation(rgb)
    threshold = auto_threshold(saturation) if settings.threshold is None else float(settings.threshold)
    mask = saturation > threshold
    del saturation  # the morphology below needs the memory more
    radius = snap(settings.closing_um / mpp)
    if radius > 0 and mask.any():
        mask = morphology.closing(mask, morphology.disk(radius, decomposition="sequence"))
    min_area = min(settings.min_area_um2, MIN_AREA_IMAGE_SHARE * image_um2) / pixel_um2
    min_fragment = min(settings.min_fragment_um2, min_area * pixel_um2) / pixel_um2
    if min_area > 1 and mask.any():
        mask = _keep_tissue_pieces(mask, rgb, min_area, min_fragment, NUCLEI_UM2 / pixel_um2)
    if settings.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
        max_gap = min(settings.max_gap_um2, GAP_IMAGE_SHARE * image_um2) / pixel_um2
        if max_gap >= 1 and mask.any():
            mask |= ~_drop_small_components(~mask, max_gap)
    return np.asarray(mask, dtype=bool)


def _smoothed_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (float32) of an RGB image, averaged over 3x3 pixels."""
    high, low = rgb.max(axis=2), rgb.min(axis=2)  # in the input's dtype: no float copy of the RGB image
    saturation = np.zeros(high.shape, np.float32)
    np.divide(high - low, high, out=saturation, where=high > 0, dtype=np.float32)
    return ndimage.uniform_filter(saturation, size=3)


def _component_sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """Pixels per label of a label image (bincount copies to int64: a block of rows at a time)."""
    sizes = np.zeros(count + 1, np.int64)
    for rows in range(0, labels.shape[0], COUNT_ROWS):
        sizes += np.bincount(labels[rows : rows + COUNT_ROWS].ravel(), minlength=count + 1)
    return sizes


def _drop_small_components(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Keep the 4-connected components of at least `min_area_px` pixels (int32 labels: a third of
    the memory skimage's remove_small_objects takes on large thumbnails)."""
    labels, count = ndimage.label(mask, output=np.int32)
    keep = _component_sizes(labels, count) >= min_area_px
    keep[0] = False
    return keep[labels]


def nucleus_pixels(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose haematoxylin optical density (Ruifrok-Johnston deconvolution) marks nuclei."""
    return color.rgb2hed(rgb)[..., 0] > NUCLEUS_DENSITY


def _keep_tissue_pieces(
    mask: np.ndarray, rgb: np.ndarray, min_area_px: float, min_fragment_px: float, nuclei_px: float
) -> np.ndarray:
    """Pieces of at least `min_area_px`, and fragments of at least `min_fragment_px` holding nuclei."""
    labels, count = ndimage.label(mask, output=np.int32)
    sizes = _component_sizes(labels, count)
    keep = sizes >= min_area_px
    keep[0] = False
    fragments = np.flatnonzero((sizes >= min_fragment_px) & ~keep)
    fragments = fragments[fragments > 0]
    if fragments.size:
        boxes = ndimage.find_objects(labels)
        for label in fragments:
            box = boxes[label - 1]
            inside = labels[box] == label
            keep[label] = int(nucleus_pixels(rgb[box])[inside].sum()) >= nuclei_px
    return keep[labels]


def mask_mpp_for(slide: Frame, mask_mpp: float | None = None) -> float:
    """The resolution tissue is detected at on a slide (its level-0 frame): MASK_MPP (or `mask_mpp`), finer for
    small images (a mask of at least MASK_MIN_SIDE pixels, never finer than the image), coarser beyond
    MASK_MAX_SIDE pixels."""
    longest = max(slide.width, slide.height) * slide.slide_mpp
    wanted = mask_mpp if mask_mpp is not None else min(MASK_MPP, longest / MASK_MIN_SIDE)
    return max(wanted, slide.slide_mpp, longest / MASK_MAX_SIDE)


def _mask_frame(slide: Frame, mask_mpp: float | None = None) -> Frame:
    """The frame of a tissue mask over the slide of level-0 frame `slide` (at least one pixel a side)."""
    frame = slide.at(mask_mpp_for(slide, mask_mpp))
    return Frame(max(1, frame.width), max(1, frame.height), frame.mpp, frame.slide_mpp, frame.origin)


def tissue_mask(slide: Slide, mask_mpp: float | None = None, settings: TissueSettings | None = None) -> TissueMask:
    """Detect tissue on a thumbnail of `slide` (see `detect_tissue`)."""
    base = slide.frame()
    frame = base.at(mask_mpp_for(base, mask_mpp))
    thumbnail = slide.read_whole(frame.scale)
    return TissueMask(detect_tissue(thumbnail, frame.mpp, settings), frame.mpp)


def _mask_from_png(path: Path, slide: Frame) -> TissueMask:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    rows, cols = pixels.shape
    if abs(cols / rows - slide.width / slide.height) > 0.02 * slide.width / slide.height:
        raise WsisegError(
            f"mask {path.name} is {cols}x{rows} but the slide is {slide.width}x{slide.height}: "
            "a PNG mask must cover the whole slide with the same aspect ratio"
        )
    return TissueMask(pixels > 0, slide.slide_mpp * slide.width / cols)


def _mask_from_geojson(path: Path, slide: Frame, mask_mpp: float | None) -> TissueMask:
    polygons = [polygon for feature in load_features(path, "fix or re-export it") for polygon in geometry_polygons(feature)]
    if not polygons:
        raise WsisegError(f"mask {path.name} holds no Polygon or MultiPolygon: draw the tissue regions as polygons")
    frame = _mask_frame(slide, mask_mpp)
    shape = (frame.height, frame.width)
    mask = np.zeros(shape, bool)
    for polygon in polygons:
        for index, ring in enumerate(polygon):
            points = np.asarray(ring, dtype=float)[:, :2]
            cols, rows = frame.from_slide(points[:, 0], points[:, 1])
            rr, cc = draw.polygon(rows, cols, shape=shape)
            mask[rr, cc] = index == 0
    return TissueMask(mask, frame.mpp)


def load_mask(path: str | Path, slide: Frame, mask_mpp: float | None = None) -> TissueMask:
    """A user-supplied tissue mask over a slide (its level-0 frame, `Slide.frame()`): a PNG over the whole
    slide (non-zero = tissue) or GeoJSON polygons in level-0 pixel coordinates of the slide file."""
    path = Path(path)
    if not path.is_file():
        raise WsisegError(f"no such mask file: {path}; check the --tissue path")
    if path.suffix.lower() in (".geojson", ".json"):
        return _mask_from_geojson(path, slide, mask_mpp)
    try:
        return _mask_from_png(path, slide)
    except OSError as error:
        raise WsisegError(f"mask {path.name} is not a readable image ({error}); pass a PNG or GeoJSON mask") from None


def full_mask(slide: Frame) -> TissueMask:
    """A mask that makes the whole image of a slide (its level-0 frame) tissue (`--tissue all`)."""
    frame = _mask_frame(slide)
    return TissueMask(np.ones((frame.height, frame.width), bool), frame.mpp)


def resolve_tissue(
    tissue: str | Path | None, slide: Slide, settings: TissueSettings | None = None
) -> tuple[TissueMask, str]:
    """The tissue mask `--tissue` asks for (auto: detected, all: everything, else a mask file) and where it
    came from ("detected", "all" or the mask's path)."""
    tissue = check_tissue_option(tissue)
    if tissue == "auto":
        return tissue_mask(slide, settings=settings), "detected"
    if tissue == "all":
        return full_mask(slide.frame()), "all"
    return load_mask(tissue, slide.frame()), str(Path(tissue).resolve())


def resolve_source_tissue(tissue: str | Path | None, reader: Any, is_store: bool) -> TissueMask:
    """`resolve_tissue` for a Slide, or for a TileStore, whose `auto` is the mask it was tiled with."""
    if not is_store:
        return resolve_tissue(tissue, reader)[0]
    tissue = check_tissue_option(tissue)
    if tissue == "auto":
        return reader.tissue
    frame = reader.slide_frame
    return full_mask(frame) if tissue == "all" else load_mask(tissue, frame)


def qc_picture(
    thumbnail: np.ndarray,
    tissue: TissueMask,
    tiles: list[tuple[int, int]] = (),  # type: ignore[assignment]
    tile: int = 0,
    image_width: int = 0,
) -> np.ndarray:
    """The thumbnail with the tissue outline (green) and the tissue tiles (blue boxes)."""
    out = np.array(thumbnail, copy=True)
    rows, cols = out.shape[:2]
    outline = segmentation.find_boundaries(tissue.resized(cols, rows), mode="inner")
    outline = morphology.dilation(outline, morphology.disk(1))
    out[outline] = (0, 200, 0)
    if tiles and image_width:
        factor = cols / image_width
        for x, y in tiles:
            x0, y0 = int(x * factor), int(y * factor)
            x1, y1 = min(int((x + tile) * factor), cols - 1), min(int((y + tile) * factor), rows - 1)
            if x1 > x0 and y1 > y0:
                out[[y0, y1], x0 : x1 + 1] = (30, 60, 220)
                out[y0 : y1 + 1, [x0, x1]] = (30, 60, 220)
    return out


def save_png(path: Path, pixels: np.ndarray) -> None:
    """Write an image as PNG through a temporary name, so a half-written file never shows."""
    with atomic_file(Path(path)) as temporary:
        Image.fromarray(pixels).save(temporary, format="PNG")
