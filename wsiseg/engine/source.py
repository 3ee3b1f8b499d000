"""The slide or tile store a run reads: its size at the segmentation MPP, its reader and its tissue."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class SourceView:
    """What the loop needs of a slide or tile store, at the segmentation MPP."""

    reader: Any  # read(x, y, w, h, mpp) -> (h, w, 3) uint8
    path: Path
    kind: str  # "slide" or "tiles"
    width: int
    height: int
    slide_mpp: float
    origin: tuple[int, int]
    tissue_option: Any = "auto"  # --tissue: auto, all or a mask file
    _tissue: Any = field(default=None, init=False, repr=False, compare=False)

    def tissue(self) -> Any:
        """The tissue mask (TissueMask) `tissue_option` asks for, made once per view (a tile store's `auto`
        is the mask it was tiled with)."""
        if self._tissue is None:
            from wsiseg.slide.tissue import resolve_source_tissue

            self._tissue = resolve_source_tissue(self.tissue_option, self.reader, self.kind == "tiles")
        return self._tissue

    def thumbnail(self, max_side: int = 2048) -> np.ndarray | None:
        """An RGB overview for the overlay: the slide's, also for a tile store whose slide is still there."""
        from wsiseg.export.overlay import source_picture

        return source_picture(self.reader, max_side)


def is_tile_store(path: Path) -> bool:
    """Whether `path` is a zarr store written by `wsiseg tile`."""
    path = Path(path)
    if not (path.is_dir() and (path / "zarr.json").is_file()):
        return False
    try:
        attributes = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attributes.get("wsiseg", {}).get("kind") == "tiles"


def open_source(source: Any, mpp: float, slide_mpp: float | None = None, tissue: Any = "auto") -> SourceView:
    """A SourceView of a path (slide file or tile store), a Slide, a TileStore or a SourceView, at `mpp`.

    `tissue` is the --tissue option (auto, all or a mask file). A SourceView given keeps its tissue
    option and mask, which do not depend on `mpp`.
    """
    from wsiseg.slide import Slide, open_slide
    from wsiseg.store.tiles import TileStore

    if isinstance(source, SourceView):
        view = open_source(source.reader, mpp, slide_mpp, source.tissue_option)
        view._tissue = source._tissue
        return view
    if isinstance(source, (str, Path)):
        source = TileStore.open(source) if is_tile_store(Path(source)) else open_slide(source, slide_mpp)
    if isinstance(source, TileStore):
        width, height = source.size_at(mpp)
        source = source if source.glass_from_source else source.with_glass_from_source()
        return SourceView(source, source.path, "tiles", width, height, source.slide_mpp, tuple(source.origin), tissue)
    if isinstance(source, Slide):
        width, height = source.size_at(mpp)
        bounds = source.bounds
        return SourceView(source, source.path, "slide", width, height, source.mpp, (bounds.x, bounds.y), tissue)
    raise TypeError(f"cannot segment a {type(source).__name__}: give a slide path, Slide or TileStore")
