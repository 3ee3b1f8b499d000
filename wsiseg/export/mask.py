"""`wsiseg export`: a mask store as a viewer file (pyramidal TIFF, OME-TIFF, GeoJSON, overlay PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.errors import WsisegError
from wsiseg.export.choices import EXPORTS, LABELS
from wsiseg.outputs import atomic_output
from wsiseg.progress import get_logger
from wsiseg.store.masks import LABELS_GROUP, MaskStore

log = get_logger("export")

DEFAULT_LABEL_NAME = "segmentation"
TIFF_COMPRESSION = "zlib"  # deflate: ASAP, libtiff, OpenSlide 3.4 and 4, Bio-Formats all read it (ASAP refuses zstd)


def write_mask_tiff(
    store: MaskStore, path: Path, flavour: str = "openslide", palette: bool = False, tile: int = 256
) -> Path:
    """The mask's pyramid as a tiled pyramidal TIFF of min-is-black labels (or with a colour table).

    Levels are padded with the background label to exact halves (see `wsiseg.export.tiff`).
    `flavour` "openslide": top-level pages (OpenSlide, ASAP); "ome": OME-TIFF with SubIFDs
    (QuPath / Bio-Formats). `palette` adds the class colours as a TIFF colour table, which
    OpenSlide renders but ASAP refuses.
    """
    from wsiseg.export.tiff import write_pyramidal_tiff

    levels = [store.level(index) for index in range(store.num_levels)]
    return write_pyramidal_tiff(
        path, levels, store.mpp, flavour=flavour, tile=tile, compression=TIFF_COMPRESSION,
        colormap=store.colors if palette else None, pad_value=store.background,
    )


def source_thumbnail(store: MaskStore, max_side: int = 2048) -> np.ndarray | None:
    """A thumbnail of the slide the mask was made from, when it can still be opened."""
    source = store.source
    if not source or not Path(source).exists():
        return None
    try:
        from wsiseg.slide import open_slide

        with open_slide(source, store.slide_mpp) as slide:
            return slide.thumbnail(max_side)
    except WsisegError as error:
        log.warning("overlay without the slide picture: %s", error)
        return None


def write_export(
    store: MaskStore, fmt: str, path: Path, thumbnail: np.ndarray | None = None, **geojson: Any
) -> Path:
    """Write one export format of `store` to `path` (no existence checks).

    `geojson`: `level`, `simplify` (µm) and `min_area` (µm²) of the GeoJSON tracing.
    """
    return EXPORTS.load(fmt)(store, path, thumbnail, geojson)


def write_tiff(store: MaskStore, path: Path, thumbnail: np.ndarray | None, geojson: dict[str, Any]) -> Path:
    """`tiff`: top-level pyramid pages of min-is-black labels (OpenSlide, ASAP)."""
    return write_mask_tiff(store, path, "openslide")


def write_palette_tiff(store: MaskStore, path: Path, thumbnail: np.ndarray | None, geojson: dict[str, Any]) -> Path:
    """`palette-tiff`: as `tiff`, with the class colours as a colour table (OpenSlide renders it, ASAP refuses it)."""
    return write_mask_tiff(store, path, "openslide", palette=True)


def write_ome_tiff(store: MaskStore, path: Path, thumbnail: np.ndarray | None, geojson: dict[str, Any]) -> Path:
    """`ome-tiff`: OME-TIFF with SubIFDs (QuPath / Bio-Formats)."""
    return write_mask_tiff(store, path, "ome")


def write_geojson_export(store: MaskStore, path: Path, thumbnail: np.ndarray | None, geojson: dict[str, Any]) -> Path:
    """`geojson`: the class regions as polygons, traced with the `geojson` options."""
    from wsiseg.export.geojson import write_geojson

    return write_geojson(store, path, **geojson)


def write_png(store: MaskStore, path: Path, thumbnail: np.ndarray | None, geojson: dict[str, Any]) -> Path:
    """`png`: the mask's colours over the slide's thumbnail (read from the slide when none is given)."""
    from wsiseg.export.overlay import write_overlay

    return write_overlay(store, path, thumbnail if thumbnail is not None else source_thumbnail(store))


def export_labels(store: MaskStore, output: Path | str | None = None, overwrite: bool = False) -> Path:
    """Write the mask as an OME-Zarr label image inside the tile store it was made from (default name `segmentation`)."""
    from wsiseg.store.tiles import TileStore

    if output is None:
        source = Path(store.source or "")
        try:
            TileStore.open(source)
        except WsisegError:
            raise WsisegError(
                f"{store.path} was segmented from {source.name or 'an unknown source'}, not a tile store: "
                "tile the slide (`wsiseg tile`), segment the store, then export its labels"
            ) from None
        output = source / LABELS_GROUP / DEFAULT_LABEL_NAME
    path = store.write_into_image(Path(output), overwrite=overwrite)
    log.info("wrote %s", path)
    return path


def open_complete(mask: Path | str) -> MaskStore:
    """Open a finished mask store, or say why it cannot be used."""
    store = MaskStore.open(Path(mask))
    if not store.is_complete:
        raise WsisegError(f"mask store {mask} is incomplete: finish it by running the same `wsiseg segment` again")
    return store


def export_mask(
    mask: Path | str,
    format: str = "tiff",
    output: Path | str | None = None,
    overwrite: bool = False,
    level: int | None = None,
    simplify: float = 0.0,
    min_area: float = 0.0,
) -> Path:
    """Export a mask.zarr as `format` (see `wsiseg.export.choices.EXPORTS`) to `output` (default: next to it).

    `level`, `simplify` (µm, 0 = off) and `min_area` (µm²) shape the
    GeoJSON polygons (see `wsiseg.export.geojson`).
    """
    if format == LABELS:
        return export_labels(open_complete(mask), output, overwrite)
    if format not in EXPORTS:
        raise WsisegError(f"unknown export format {format!r}: use one of {', '.join([*EXPORTS, LABELS])}")
    store = open_complete(mask)
    final = Path(output) if output is not None else Path(mask).parent / EXPORTS.detail(format)
    with atomic_output(final, overwrite=overwrite, resume=False) as partial:
        write_export(store, format, partial, level=level, simplify=simplify, min_area=min_area)
    log.info("wrote %s", final)
    return final

