"""Tissue masks: detection on a thumbnail (saturation + Otsu), user masks (PNG, GeoJSON), QC pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw, filters, morphology, segmentation

from wsiseg.errors import WsisegError
from wsiseg.outputs import atomic_file
from wsiseg.polygons import geometry_polygons, load_features
from wsiseg.slide.mask import TissueMask
from wsiseg.slide.reader import Slide, snap

__all__ = ["TissueMask", "detect_tissue", "load_mask", "qc_picture", "save_png", "tissue_mask"]

# Tissue is detected at this resolution (coarser for very large slides, so the mask stays small).
MASK_MPP = 4.0
MASK_MAX_SIDE = 4096
COUNT_ROWS = 256  # rows of a label image counted at a time


def detect_tissue(
    thumbnail_rgb: np.ndarray,
    threshold: float | None = None,
    min_saturation: float = 0.05,
    closing_px: int = 2,
    opening_px: int = 1,
    min_area_px: int = 16,
    fill_holes: bool = True,
) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail on white background.

    Pixels whose HSV saturation exceeds a threshold (Otsu's, but never below `min_saturation`,
    so a blank slide stays empty) are tissue; then a closing and an opening (disk radii in
    pixels), removal of components smaller than `min_area_px`, and filling of holes.
    """
    saturation = _smoothed_saturation(np.asarray(thumbnail_rgb))
    if threshold is None:
        spread = float(saturation.max() - saturation.min())
        threshold = filters.threshold_otsu(saturation) if spread > 1e-6 else 1.0
    mask = saturation > max(float(threshold), min_saturation)
    del saturation  # the morphology below needs the memory more
    if closing_px > 0:
        mask = morphology.closing(mask, morphology.disk(closing_px))
    if opening_px > 0:
        mask = morphology.opening(mask, morphology.disk(opening_px))
    if min_area_px > 1 and mask.any():
        mask = _drop_small_components(mask, min_area_px)
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return np.asarray(mask, dtype=bool)


def _smoothed_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (float32) of an RGB image, averaged over 3x3 pixels."""
    high, low = rgb.max(axis=2), rgb.min(axis=2)  # in the input's dtype: no float copy of the RGB image
    saturation = np.zeros(high.shape, np.float32)
    np.divide(high - low, high, out=saturation, where=high > 0, dtype=np.float32)
    return ndimage.uniform_filter(saturation, size=3)


def _drop_small_components(mask: np.ndarray, min_area_px: int) -> np.ndarray:
    """Keep the 4-connected components of at least `min_area_px` pixels (int32 labels: a third of
    the memory skimage's remove_small_objects takes on large thumbnails)."""
    labels, count = ndimage.label(mask, output=np.int32)
    sizes = np.zeros(count + 1, np.int64)
    for rows in range(0, labels.shape[0], COUNT_ROWS):  # bincount copies its input to int64: a block at a time
        sizes += np.bincount(labels[rows : rows + COUNT_ROWS].ravel(), minlength=count + 1)
    keep = sizes >= min_area_px
    keep[0] = False
    return keep[labels]


def mask_mpp_for(slide: Slide, mask_mpp: float | None = None) -> float:
    """The resolution tissue is detected at: MASK_MPP, coarser when the mask would exceed MASK_MAX_SIDE."""
    bounds = slide.bounds
    longest = max(bounds.width, bounds.height) * slide.mpp
    return max(mask_mpp or MASK_MPP, slide.mpp, longest / MASK_MAX_SIDE)


def tissue_mask(
    slide: Slide,
    mask_mpp: float | None = None,
    threshold: float | None = None,
    min_saturation: float = 0.05,
    closing_um: float = 16.0,
    opening_um: float = 8.0,
    min_area_um2: float = 20_000.0,
    fill_holes: bool = True,
) -> TissueMask:
    """Detect tissue on a thumbnail of `slide`; sizes are given in micrometres so they mean the same at any MPP."""
    mpp = mask_mpp_for(slide, mask_mpp)
    thumbnail = slide.read_whole(mpp / slide.mpp)
    mask = detect_tissue(
        thumbnail,
        threshold=threshold,
        min_saturation=min_saturation,
        closing_px=snap(closing_um / mpp),
        opening_px=snap(opening_um / mpp),
        min_area_px=max(1, snap(min_area_um2 / mpp**2)),
        fill_holes=fill_holes,
    )
    return TissueMask(mask, mpp)


def _mask_from_png(path: Path, slide: Slide) -> TissueMask:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    rows, cols = pixels.shape
    bounds = slide.bounds
    if abs(cols / rows - bounds.width / bounds.height) > 0.02 * bounds.width / bounds.height:
        raise WsisegError(
            f"mask {path.name} is {cols}x{rows} but the slide is {bounds.width}x{bounds.height}: "
            "a PNG mask must cover the whole slide with the same aspect ratio"
        )
    return TissueMask(pixels > 0, slide.mpp * bounds.width / cols)


def _mask_from_geojson(path: Path, slide: Slide, mask_mpp: float | None) -> TissueMask:
    polygons = [polygon for feature in load_features(path, "fix or re-export it") for polygon in geometry_polygons(feature)]
    if not polygons:
        raise WsisegError(f"mask {path.name} holds no Polygon or MultiPolygon: draw the tissue regions as polygons")
    mpp = mask_mpp_for(slide, mask_mpp)
    bounds = slide.bounds
    scale = mpp / slide.mpp  # level-0 pixels per mask pixel
    shape = (max(1, snap(bounds.height / scale)), max(1, snap(bounds.width / scale)))
    mask = np.zeros(shape, bool)
    for polygon in polygons:
        for index, ring in enumerate(polygon):
            points = np.asarray(ring, dtype=float)[:, :2]
            cols = (points[:, 0] - bounds.x) / scale
            rows = (points[:, 1] - bounds.y) / scale
            rr, cc = draw.polygon(rows, cols, shape=shape)
            mask[rr, cc] = index == 0
    return TissueMask(mask, mpp)


def load_mask(path: str | Path, slide: Slide, mask_mpp: float | None = None) -> TissueMask:
    """A user-supplied tissue mask: a PNG over the whole slide (non-zero = tissue) or GeoJSON polygons
    in level-0 pixel coordinates of the slide file."""
    path = Path(path)
    if not path.is_file():
        raise WsisegError(f"no such mask file: {path}; check the --tissue-mask path")
    if path.suffix.lower() in (".geojson", ".json"):
        return _mask_from_geojson(path, slide, mask_mpp)
    try:
        return _mask_from_png(path, slide)
    except OSError as error:
        raise WsisegError(f"mask {path.name} is not a readable image ({error}); pass a PNG or GeoJSON mask") from None


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
