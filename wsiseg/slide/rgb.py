"""RGB on white from RGBA pixels: the compositing every backend applies, exact in integers."""

from __future__ import annotations

import numpy as np
from PIL import Image


def on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA onto white, returning RGB uint8 (a view of `rgba` where it is opaque)."""
    if opaque(rgba):
        return rgba[..., :3]
    return composite_on_white(rgba, pick_channels(rgba, (0, 1, 2)))


def pick_channels(pixels: np.ndarray, order: tuple[int, int, int]) -> np.ndarray:
    """A new contiguous (h, w, 3) array of the channels `order` of `pixels` (one strided copy per channel:
    numpy copies 3 of every 4 bytes about 4x slower in one go)."""
    out = np.empty((*pixels.shape[:2], 3), np.uint8)
    for index, channel in enumerate(order):
        out[..., index] = pixels[..., channel]
    return out


def composite_on_white(rgba: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """`rgb` (the colours of straight-alpha `rgba`) with its translucent pixels composited onto white, in place."""
    translucent = rgba[..., 3] < 255
    part = rgba[translucent]
    a = part[:, 3:4].astype(np.uint16)
    rgb[translucent] = ((part[:, :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return rgb


def opaque(rgba: np.ndarray) -> bool:
    """Whether every pixel of an RGBA array has alpha 255 (fast on contiguous little-endian arrays)."""
    if np.little_endian and rgba.flags.c_contiguous and rgba.dtype == np.uint8:
        return bool(rgba.view(np.uint32).min() >= 0xFF000000)
    return bool(rgba[..., 3].min() == 255)


def pillow_on_white(image: Image.Image) -> np.ndarray:
    """RGB uint8 (h, w, 3) of an RGBA Pillow image composited on white, packed by Pillow when it is opaque.

    Pillow drops the alpha bytes about 7x faster than a numpy copy of the RGB view of an RGBA array.
    """
    if np.frombuffer(image.tobytes("raw", "A"), np.uint8).min() == 255:
        packed = np.frombuffer(bytearray(image.tobytes("raw", "RGB")), np.uint8)
        return packed.reshape(image.height, image.width, 3)
    return on_white(np.asarray(image))
