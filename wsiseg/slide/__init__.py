"""Reading whole-slide images: the Slide abstraction, tissue masks and integer tile grids.

`Bounds`, `Slide` and `open_slide` load the readers (OpenSlide, tifffile, zarr) on first use, so
the light modules of this package (mask, grid) import without them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Bounds", "Slide", "open_slide"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from wsiseg.slide import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'wsiseg.slide' has no attribute {name!r}")
