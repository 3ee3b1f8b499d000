"""Read mask TIFFs through the system's OpenSlide (Debian/Ubuntu's 3.4.1), as older viewers do (by hand).

Install the library first: `apt-get install -y libopenslide0`. The library is called through
ctypes, so openslide-python (which prefers the openslide-bin 4.x wheel) stays out of the way.
With no file given, a synthetic label mask is exported in every TIFF flavour and checked.
For each file: the version, levels, downsamples and MPP properties 3.4 reports, then
`read_region` at random offsets of every level compared with the pixels tifffile decodes
(an exact pyramid reads back exactly; a label TIFF reads back as grey = label, a palette one as
its colours). Exits non-zero when any read differs.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_LIBRARY = "libopenslide.so.0"


class SystemOpenSlide:
    """The handful of OpenSlide C functions this check needs."""

    def __init__(self, library: str) -> None:
        lib = ctypes.CDLL(library)
        lib.openslide_get_version.restype = ctypes.c_char_p
        lib.openslide_open.restype = ctypes.c_void_p
        lib.openslide_open.argtypes = [ctypes.c_char_p]
        lib.openslide_get_error.restype = ctypes.c_char_p
        lib.openslide_get_error.argtypes = [ctypes.c_void_p]
        lib.openslide_get_level_count.restype = ctypes.c_int32
        lib.openslide_get_level_count.argtypes = [ctypes.c_void_p]
        lib.openslide_get_level_dimensions.argtypes = [
            ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)
        ]
        lib.openslide_get_level_downsample.restype = ctypes.c_double
        lib.openslide_get_level_downsample.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        lib.openslide_get_property_value.restype = ctypes.c_char_p
        lib.openslide_get_property_value.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.openslide_read_region.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
            ctypes.c_int64, ctypes.c_int64,
        ]
        lib.openslide_close.argtypes = [ctypes.c_void_p]
        self.lib = lib
        self.version = lib.openslide_get_version().decode()

    def open(self, path: Path) -> int:
        handle = self.lib.openslide_open(str(path).encode())
        if not handle:
            raise RuntimeError(f"OpenSlide {self.version} does not recognise {path}")
        error = self.lib.openslide_get_error(handle)
        if error:
            raise RuntimeError(f"OpenSlide {self.version} cannot read {path}: {error.decode()}")
        return handle

    def levels(self, handle: int) -> list[tuple[int, int, float]]:
        """(width, height, downsample) of every level."""
        out = []
        for level in range(self.lib.openslide_get_level_count(handle)):
            width, height = ctypes.c_int64(), ctypes.c_int64()
            self.lib.openslide_get_level_dimensions(handle, level, ctypes.byref(width), ctypes.byref(height))
            out.append((width.value, height.value, self.lib.openslide_get_level_downsample(handle, level)))
        return out

    def property(self, handle: int, name: str) -> str | None:
        value = self.lib.openslide_get_property_value(handle, name.encode())
        return value.decode() if value else None

    def read_region(self, handle: int, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGBA uint8 (height, width, 4), un-premultiplied (opaque pixels are exact)."""
        buffer = (ctypes.c_uint32 * (width * height))()
        self.lib.openslide_read_region(handle, buffer, x, y, level, width, height)
        error = self.lib.openslide_get_error(handle)
        if error:
            raise RuntimeError(error.decode())
        argb = np.frombuffer(buffer, np.uint32).reshape(height, width)
        return np.stack([(argb >> 16) & 255, (argb >> 8) & 255, argb & 255, argb >> 24], axis=-1).astype(np.uint8)


def expected_rgb(page) -> np.ndarray:
    """The RGB a viewer should show for a TIFF page: its colour table applied, or grey = value."""
    values = page.asarray()
    if page.colormap is not None:
        return (page.colormap.T[values] // 257).astype(np.uint8)
    return np.repeat(values[..., None], 3, axis=2).astype(np.uint8)


def check(openslide: SystemOpenSlide, path: Path, reads: int, rng: np.random.Generator) -> bool:
    import tifffile

    handle = openslide.open(path)
    try:
        levels = openslide.levels(handle)
        print(f"{path.name}: OpenSlide {openslide.version}, vendor {openslide.property(handle, 'openslide.vendor')}")
        for name in ("openslide.mpp-x", "openslide.mpp-y", "tiff.XResolution", "tiff.ResolutionUnit"):
            print(f"  {name} = {openslide.property(handle, name)}")
        ok = True
        with tifffile.TiffFile(path) as tiff:
            pages = [page for page in tiff.pages if page.is_tiled]
            for level, (width, height, downsample) in enumerate(levels):
                truth = expected_rgb(pages[level])
                bad = 0
                for _ in range(reads):
                    w, h = int(rng.integers(1, min(64, width) + 1)), int(rng.integers(1, min(64, height) + 1))
                    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                    factor = round(downsample)
                    rgba = openslide.read_region(handle, x * factor, y * factor, level, w, h)
                    if not (rgba[..., 3] == 255).all() or not np.array_equal(rgba[..., :3], truth[y : y + h, x : x + w]):
                        bad += 1
                print(f"  level {level}: {width}x{height}, downsample {downsample:g}: "
                      f"{reads - bad}/{reads} random reads exact")
                ok = ok and bad == 0
        return ok
    finally:
        openslide.lib.openslide_close(handle)


def synthetic_exports(folder: Path) -> list[Path]:
    """A 1500 x 1100 label mask (5 classes, blocks and specks) exported as every TIFF flavour."""
    from wsiseg.export.mask import export_mask
    from wsiseg.slide.grid import Frame
    from wsiseg.store.masks import MaskStore

    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 5, (1500 // 5, 1100 // 5)), np.ones((5, 5), np.int64)).astype(np.uint8)
    store = MaskStore.create(folder / "mask.zarr", Frame(1100, 1500, 0.5, 0.5), class_names=[f"c{i}" for i in range(5)])
    store.write_rows(0, labels)
    store.finish()
    return [export_mask(folder / "mask.zarr", fmt) for fmt in ("tiff", "palette-tiff")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tiffs", nargs="*", type=Path, help="TIFFs to check (default: synthetic exports)")
    parser.add_argument("--library", default=DEFAULT_LIBRARY, help=f"the OpenSlide C library [{DEFAULT_LIBRARY}]")
    parser.add_argument("--reads", type=int, default=200, help="random reads per level [200]")
    args = parser.parse_args()
    try:
        openslide = SystemOpenSlide(args.library)
    except OSError as error:
        print(f"cannot load {args.library} ({error}): apt-get install -y libopenslide0", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        paths = args.tiffs or synthetic_exports(Path(scratch))
        results = []
        for path in paths:
            try:
                results.append(check(openslide, path, args.reads, rng))
            except RuntimeError as error:
                print(f"{path.name}: {error}")
                results.append(False)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
