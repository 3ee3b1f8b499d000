"""Tissue detection side by side: wsiseg's `auto` against Otsu thumbnail methods of established tools.

Both baselines are written here from their documented descriptions (no code of those projects):

- otsu-grey (histolab's TissueMask, TIAToolbox's OtsuTissueMasker): a thumbnail scaled 1/32,
  greyscale, Otsu's threshold (tissue is darker), a binary dilation, holes filled, small objects
  removed (histolab's documented steps; its defaults, in thumbnail pixels).
- otsu-saturation (the CLAM / TRIDENT classical segmenter): a thumbnail at about 8 MPP (1.25x),
  HSV saturation, median blur, Otsu's threshold, a morphological closing, tissue pieces smaller
  than a fixed area dropped (16,000 um2 here, a 126 um square), holes filled.

The truth is made at full resolution (0.5 MPP) independently of all three: a pixel is tissue when
it absorbs light (optical density against the glass above 0.06 in some channel), after a 3x3
median, a 2 um closing, holes filled and specks under 20 um2 removed. Recall = detected share of
the true tissue; precision = true share of the detected; "pieces" = true pieces of at least
200 um2 (a few cells) with at least half their area detected.

Images: the CMU sample (real Aperio SVS, 0.499 MPP); crops of it of 224, 448 and 1024 px (on
tissue, across an edge, on the strand); a 2 x 2 mosaic of it (a larger slide); a scatter of
small real fragments on its glass (a TMA-like or fragmented biopsy); all-tissue crops of the
hgsc H&E image (truth: all tissue).

    .venv/bin/python tools/compare_tissue.py [--out tissue_compare]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import filters, morphology

from wsiseg.samples import fetch_samples
from wsiseg.slide import open_slide
from wsiseg.slide.tissue import MASK_MAX_SIDE, MASK_MIN_SIDE, MASK_MPP, detect_tissue, qc_picture
from wsiseg.slide.mask import TissueMask

CMU_MPP = 0.499


def shrink(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Area-averaged thumbnail `factor` times smaller (at least 1 px a side)."""
    height, width = rgb.shape[:2]
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def upsample(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask resized to `shape` (nearest), the way a tiler samples a thumbnail mask."""
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(image) > 127


def wsiseg_auto(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """wsiseg's detector at the resolution `tissue_mask` picks for an image of this size."""
    longest = max(rgb.shape[:2]) * mpp
    mask_mpp = max(min(MASK_MPP, longest / MASK_MIN_SIDE), mpp, longest / MASK_MAX_SIDE)
    return upsample(detect_tissue(shrink(rgb, mask_mpp / mpp), mask_mpp), rgb.shape[:2])


def otsu_grey(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """histolab-style TissueMask: 1/32 thumbnail, grey < Otsu, dilation, holes filled, small objects removed."""
    thumbnail = shrink(rgb, 32)
    grey = thumbnail.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    mask = grey < filters.threshold_otsu(grey) if np.ptp(grey) > 0 else np.zeros(grey.shape, bool)
    mask = ndimage.binary_dilation(mask, morphology.disk(5))
    mask = ndimage.binary_fill_holes(mask)
    mask = morphology.remove_small_objects(mask, max_size=3000)
    return upsample(mask, rgb.shape[:2])


def otsu_saturation(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """CLAM/TRIDENT-style: ~8 MPP thumbnail, saturation, median blur, Otsu, closing, area filter, holes filled."""
    factor = max(1.0, 8.0 / mpp)
    thumbnail = shrink(rgb, factor)
    high, low = thumbnail.max(axis=2).astype(np.float32), thumbnail.min(axis=2).astype(np.float32)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1), 0) * 255
    saturation = ndimage.median_filter(saturation, size=7)
    if np.ptp(saturation) == 0:
        return np.zeros(rgb.shape[:2], bool)
    mask = saturation > filters.threshold_otsu(saturation)
    mask = ndimage.binary_closing(mask, np.ones((4, 4), bool))
    pixel_um2 = (mpp * factor) ** 2
    mask = morphology.remove_small_objects(mask, max_size=max(1, int(16_000 / pixel_um2)))
    mask = ndimage.binary_fill_holes(mask)
    return upsample(mask, rgb.shape[:2])


METHODS = {"wsiseg auto": wsiseg_auto, "otsu-grey": otsu_grey, "otsu-saturation": otsu_saturation}


def truth_mask(rgb: np.ndarray, mpp: float, glass: np.ndarray) -> np.ndarray:
    """Full-resolution reference: absorbing pixels against the glass colour, cleaned (see the module doc)."""
    smooth = ndimage.median_filter(rgb, size=(3, 3, 1)).astype(np.float32)
    density = -np.log10(np.clip(smooth, 1, None) / glass[None, None, :])
    mask = density.max(axis=2) > 0.06
    mask = ndimage.binary_closing(mask, morphology.disk(max(1, round(2 / mpp))), border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    return morphology.remove_small_objects(mask, max_size=max(1, int(20 / mpp**2)))


def scores(detected: np.ndarray, truth: np.ndarray, mpp: float) -> dict[str, float]:
    """Recall, precision and piece recall of a detected mask against the truth."""
    overlap = (detected & truth).sum()
    labels, count = ndimage.label(truth)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    hits = np.bincount(labels[detected].ravel(), minlength=count + 1)
    pieces = [i for i in range(1, count + 1) if sizes[i] * mpp**2 >= 200]
    found = sum(hits[i] >= 0.5 * sizes[i] for i in pieces)
    return {
        "recall": overlap / truth.sum() if truth.any() else float("nan"),
        "precision": overlap / detected.sum() if detected.any() else float("nan"),
        "pieces": f"{found}/{len(pieces)}",
    }


def images(samples: dict[str, Path]) -> list[tuple[str, np.ndarray, float, np.ndarray | None]]:
    """(name, RGB, MPP, truth or None: computed from the image) of every test image."""
    with open_slide(samples["cmu_svs"]) as slide:
        cmu = slide.read(0, 0, *slide.size_at(CMU_MPP), CMU_MPP)
    out: list[tuple[str, np.ndarray, float, np.ndarray | None]] = [("CMU slide 2220x2967", cmu, CMU_MPP, None)]
    for name, (x, y, side) in {
        "CMU crop 224 on tissue": (1150, 2300, 224),
        "CMU crop 448 on tissue": (1000, 2000, 448),
        "CMU crop 448 across an edge": (520, 1900, 448),
        "CMU crop 1024 with the strand": (0, 700, 1024),
        "CMU crop 224 on the strand": (300, 980, 224),
    }.items():
        out.append((name, np.ascontiguousarray(cmu[y : y + side, x : x + side]), CMU_MPP, None))
    out.append(("CMU 2x2 mosaic 4440x5934", np.concatenate([np.concatenate([cmu, cmu], 1)] * 2, 0), CMU_MPP, None))
    glass_tile = cmu[1500:1700, 0:200]
    canvas = np.tile(glass_tile, (20, 20, 1))  # 4000 x 4000 px of real glass, 2 mm
    rng = np.random.default_rng(0)
    for index in range(16):
        side = int(rng.integers(50, 130))
        x, y = int(rng.integers(700, 1400)), int(rng.integers(300, 2700))
        piece = cmu[y : y + side, x : x + side]
        cx, cy = 150 + (index % 4) * 1000, 150 + (index // 4) * 1000
        canvas[cy : cy + side, cx : cx + side] = piece
    out.append(("16 small fragments on 2 mm of glass", canvas, CMU_MPP, None))
    hgsc = np.asarray(Image.open(samples["hgsc_image"]).convert("RGB"))
    for side in (224, 288, 512):
        crop = np.ascontiguousarray(hgsc[600 : 600 + side, 600 : 600 + side])
        out.append((f"hgsc all-tissue crop {side} at 0.5 MPP", crop, 0.5, np.ones(crop.shape[:2], bool)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="Folder for QC pictures (truth, each method).")
    args = parser.parse_args()
    samples = fetch_samples()
    with open_slide(samples["cmu_svs"]) as slide:
        glass = np.median(slide.read(0, 1500, 200, 400, CMU_MPP).reshape(-1, 3), axis=0).astype(np.float32)
    print(f"glass colour (median of the CMU's left margin): {glass.astype(int).tolist()}")
    header = "| image | truth % | " + " | ".join(f"{m} recall / precision / pieces" for m in METHODS) + " |"
    print(header)
    print("|" + "---|" * (2 + len(METHODS)))
    for name, rgb, mpp, truth in images(samples):
        truth = truth_mask(rgb, mpp, glass) if truth is None else truth
        cells = []
        for method_name, method in METHODS.items():
            started = time.perf_counter()
            detected = method(rgb, mpp)
            seconds = time.perf_counter() - started
            result = scores(detected, truth, mpp)
            cells.append(f"{result['recall']:.3f} / {result['precision']:.3f} / {result['pieces']} ({seconds:.2f} s)")
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                picture = qc_picture(shrink(rgb, max(1, max(rgb.shape[:2]) / 1024)), TissueMask(detected, mpp))
                Image.fromarray(picture).save(args.out / f"{name.replace(' ', '_')}-{method_name.replace(' ', '_')}.png")
        print(f"| {name} | {100 * truth.mean():.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
