"""`wsiseg info` and `wsiseg tile`: describe slides, and tile their tissue into zarr stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


@click.command("info")
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--slide-mpp", type=float, default=None, help="The slide's own MPP, where its metadata lacks it.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info_command(slide: Path, slide_mpp: float | None, as_json: bool) -> None:
    """Show a slide's format, levels and sizes, MPP, objective power and associated images."""
    from wsiseg.slide import open_slide

    with open_slide(slide, slide_mpp) as opened:
        info = opened.info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    mpp = f"{info['mpp']:g} ({info['mpp_source']})" if info["mpp"] else "unknown (pass --slide-mpp)"
    bounds = info["bounds"]
    lines = [
        f"path              {info['path']}",
        f"format            {info['format']}",
        f"vendor            {info['vendor'] or '-'}",
        f"size              {info['levels'][0]['width']}x{info['levels'][0]['height']}",
        f"mpp               {mpp}",
        f"objective power   {info['objective_power'] or '-'}",
        f"bounds            x={bounds['x']} y={bounds['y']} {bounds['width']}x{bounds['height']}",
        f"associated images {', '.join(info['associated_images']) or '-'}",
        "levels",
    ]
    lines += [f"  {l['level']}: {l['width']}x{l['height']} (downsample {l['downsample']:g})" for l in info["levels"]]
    click.echo("\n".join(lines))


@click.command("tile")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--mpp", type=float, required=True, help="Target resolution of the tiles, micrometres per pixel.")
@click.option(
    "--out", type=click.Path(path_type=Path), required=True,
    help="Folder receiving <slide name>.zarr per slide, or the store itself when it ends in .zarr (one slide).",
)
@click.option("--slide-mpp", type=float, default=None, help="The slides' own MPP, where their metadata lacks it.")
@click.option("--tile", type=int, default=512, show_default=True, help="Tile (and chunk) size in pixels.")
@click.option("--workers", default="auto", show_default=True,
              help="Writer threads without --scheduler (auto: min(4, CPUs); 0: in the main thread).")
@click.option("--scheduler", default=None, help="Address of an existing dask.distributed scheduler to use instead.")
@click.option("--tissue", default="auto", show_default=True,
              help="auto (detect), all (the whole image), or a mask: PNG over the slide or GeoJSON polygons in level-0 pixels.")
@click.option("--tissue-mask", type=click.Path(path_type=Path), default=None, hidden=True,
              help="Same as --tissue PATH (older name).")
@click.option("--tissue-threshold", type=float, default=None,
              help="Saturation threshold for tissue (0-1) [default: Otsu's, kept within 0.05-0.12].")
@click.option("--min-tissue-area", type=float, default=2_000.0, show_default=True,
              help="Drop tissue pieces smaller than this many square micrometres, unless they hold nuclei.")
@click.option("--skip-errors", is_flag=True, help="Go on past slides that fail, and report them at the end.")
@click.option("--overwrite", is_flag=True, help="Replace existing stores.")
def tile_command(slides: tuple[Path, ...], **options: Any) -> None:
    """Detect tissue on SLIDES and write their tissue tiles at --mpp into zarr stores (resumable)."""
    from wsiseg.progress import setup_console_logging
    from wsiseg.slide.mask import check_tissue_option

    mask_file, tissue = options.pop("tissue_mask"), options.pop("tissue")
    tissue = mask_file if mask_file is not None else tissue
    check_tissue_option(tissue)  # before dask and the imaging libraries load
    from wsiseg.driver import check_results, summary_table
    from wsiseg.store.tiling import tile_slides

    setup_console_logging()
    detection = {"threshold": options.pop("tissue_threshold"), "min_area_um2": options.pop("min_tissue_area")}
    results = tile_slides(
        slides, options.pop("out"), options.pop("mpp"), tissue=tissue, tissue_options=detection, **options
    )
    click.echo(summary_table(results, "tiles"))
    check_results(results)
