"""TissueMask: a boolean mask over a slide at a known MPP, asked whether boxes at any MPP hold tissue; and the
`--tissue` option (auto, all or a mask file), checked here without the imaging libraries detection needs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wsiseg.errors import WsisegError


@dataclass
class TissueMask:
    """A boolean tissue mask over the slide's bounds, at `mpp` micrometres per mask pixel."""

    mask: np.ndarray
    mpp: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]

    @property
    def fraction(self) -> float:
        """Share of the slide area covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def box(self, x: int, y: int, width: int, height: int, mpp: float) -> tuple[int, int, int, int]:
        """The mask pixels (x0, y0, x1, y1) covering a box of the image at `mpp`."""
        factor = mpp / self.mpp
        rows, cols = self.mask.shape
        x0 = min(max(int(math.floor(x * factor)), 0), cols)
        y0 = min(max(int(math.floor(y * factor)), 0), rows)
        x1 = min(max(int(math.ceil((x + width) * factor)), 0), cols)
        y1 = min(max(int(math.ceil((y + height) * factor)), 0), rows)
        return x0, y0, x1, y1

    def covers(self, x: int, y: int, width: int, height: int, mpp: float) -> bool:
        """Whether any tissue lies in the box at (x, y) of size (width, height) in the image at `mpp`."""
        x0, y0, x1, y1 = self.box(x, y, width, height, mpp)
        return bool(self.mask[y0:y1, x0:x1].any())

    def resized(self, width: int, height: int) -> np.ndarray:
        """The mask as a bool array of another size (nearest neighbour)."""
        image = Image.fromarray(self.mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
        return np.asarray(image) > 127

    def sample_rows(self, y0: int, rows: int, width: int, mpp: float) -> np.ndarray:
        """The mask on the pixel grid of image rows y0..y0+rows (all `width` columns) at `mpp`, nearest."""
        if self.mask.size == 0:
            return np.zeros((rows, width), bool)
        factor = mpp / self.mpp
        ys = np.minimum(((np.arange(y0, y0 + rows) + 0.5) * factor).astype(np.intp), self.mask.shape[0] - 1)
        xs = np.minimum(((np.arange(width) + 0.5) * factor).astype(np.intp), self.mask.shape[1] - 1)
        rows_needed, repeats = np.unique(ys, return_counts=True)  # ys never decreases: each mask row once
        return np.repeat(self.mask[rows_needed][:, xs], repeats, axis=0)


TISSUE_MODES = ("auto", "all")
MASK_SUFFIXES = (".png", ".geojson", ".json")


def check_tissue_option(tissue: str | Path | None) -> str | Path:
    """`auto`, `all` or the path of an existing PNG or GeoJSON mask; a WsisegError otherwise (a cheap check
    made before any slide is read or model loaded)."""
    if tissue is None or str(tissue) in TISSUE_MODES:
        return "auto" if tissue is None else str(tissue)
    path = Path(tissue)
    if path.suffix.lower() not in MASK_SUFFIXES:
        raise WsisegError(
            f"--tissue {tissue}: use auto (detect), all (the whole image) or a .png or .geojson mask file"
        )
    if not path.is_file():
        raise WsisegError(f"no such tissue mask file: {path}; check the --tissue path")
    return path


def tissue_request(tissue: str | Path | None) -> str | dict[str, object]:
    """What a `--tissue` value asks for, as a run records it to know whether a rerun asks the same:
    auto or all, or a mask file's path, size and modification time (an edited mask is another request)."""
    tissue = check_tissue_option(tissue)
    if isinstance(tissue, str):
        return tissue
    stat = tissue.stat()
    return {"path": str(tissue.resolve()), "size": stat.st_size, "mtime": stat.st_mtime}
