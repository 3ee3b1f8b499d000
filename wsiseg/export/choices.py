"""The export formats, registered once and light to import (the CLI and the run's output check read them).

Each format names its writer, `writer(store, path, thumbnail, geojson options) -> path`, and the
file it is written to next to the mask store.
"""

from __future__ import annotations

from wsiseg.choices import Choices

EXPORTS = Choices("export format", {
    "tiff": ("wsiseg.export.mask:write_tiff", "mask.tif"),
    "palette-tiff": ("wsiseg.export.mask:write_palette_tiff", "mask.palette.tif"),
    "ome-tiff": ("wsiseg.export.mask:write_ome_tiff", "mask.ome.tif"),
    "geojson": ("wsiseg.export.mask:write_geojson_export", "mask.geojson"),
    "png": ("wsiseg.export.mask:write_png", "overlay.png"),
})
DEFAULT_EXPORTS = ("tiff", "ome-tiff", "png")  # what `segment` and `fseg` write unless told otherwise
LABELS = "labels"  # `wsiseg export` only: a label image inside the source tile store, not a file beside the mask
