"""OpenSlide regions read straight into numpy and turned into RGB on white, without a Pillow image.

`OpenSlide.read_region` decodes into a buffer, un-premultiplies every pixel into RGBA and wraps a
Pillow image around it; getting RGB out of that image costs two more passes and copies. Here the
decoder writes its premultiplied ARGB into a numpy array; where every pixel is opaque (nearly
always: alpha is below 255 only where a slide has no scanned tiles or a viewer-made alpha channel)
premultiplied and straight colours are equal, and the RGB channels are copied out directly.
Elsewhere openslide-python's own un-premultiply runs first, so the pixels are those of
`read_region`, composited as `on_white` does. Both entry points are openslide-python internals:
without them (another version) reads go through `read_region`.
"""

from __future__ import annotations

import sys
from ctypes import POINTER, c_uint32
from typing import Any

import numpy as np

from wsiseg.slide.rgb import composite_on_white, pick_channels, pillow_on_white

try:
    from openslide import _convert, lowlevel

    READ_INTO: Any = lowlevel._read_region  # openslide_read_region into a caller's uint32 buffer
    UNPREMULTIPLY: Any = _convert.argb2rgba  # premultiplied native ARGB -> straight RGBA bytes, in place
except (ImportError, AttributeError):
    READ_INTO = UNPREMULTIPLY = None

# where R, G and B sit among the 4 bytes of a native-endian uint32 ARGB pixel
RGB_BYTES = (2, 1, 0) if sys.byteorder == "little" else (1, 2, 3)
OPAQUE = 0xFF000000  # the smallest ARGB value with alpha 255


def read_rgb(handle: Any, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (h, w, 3) of `handle.read_region(location, level, size)` composited on white (sizes > 0)."""
    raw = getattr(handle, "_osr", None)
    if READ_INTO is None or UNPREMULTIPLY is None or raw is None:
        return pillow_on_white(handle.read_region(location, level, size))
    width, height = size
    argb = np.empty((height, width), np.uint32)
    READ_INTO(raw, argb.ctypes.data_as(POINTER(c_uint32)), location[0], location[1], level, width, height)
    return argb_on_white(argb)


def argb_on_white(argb: np.ndarray) -> np.ndarray:
    """RGB uint8 (h, w, 3) of OpenSlide's premultiplied native-endian ARGB pixels (h, w) composited on white
    (the array is converted in place where some pixel is translucent)."""
    pixels = argb.view(np.uint8).reshape(*argb.shape, 4)
    if argb.min() >= OPAQUE:
        return pick_channels(pixels, RGB_BYTES)
    UNPREMULTIPLY(argb)
    return composite_on_white(pixels, pick_channels(pixels, (0, 1, 2)))
