"""`wsiseg segment`, `wsiseg export` and `wsiseg eval`: whole-slide segmentation, viewer exports, metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from wsiseg.choices import either
from wsiseg.engine.choices import BLENDS, PREDICTION_MODES
from wsiseg.engine.settings import RunSettings
from wsiseg.export.choices import DEFAULT_EXPORTS, EXPORTS, LABELS


@click.command("segment")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True, help="Checkpoint from `wsiseg train`.")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="The training YAML [default: the config stored in the checkpoint].")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output folder (one slide), or folder of <slide name>/ folders (several).")
@click.option("--mode", type=click.Choice(PREDICTION_MODES.names), default=RunSettings.mode, show_default=True)
@click.option("--mpp", type=float, default=None, help="Segmentation MPP [default: dataset.mpp of the config].")
@click.option("--slide-mpp", type=float, default=None, help="The slides' own MPP, where their metadata lacks it.")
@click.option("--window", type=int, default=None, help="Window side in pixels [default: model.input_size].")
@click.option("--overlap", type=float, default=RunSettings.overlap, show_default=True,
              help="Window overlap, a fraction of the window.")
@click.option("--blend", type=click.Choice(BLENDS.names), default=RunSettings.blend, show_default=True)
@click.option("--batch-size", type=int, default=RunSettings.batch_size, show_default=True)
@click.option("--device", default=RunSettings.device, show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--workers", default=RunSettings.workers, show_default=True,
              help="Reader threads (auto: all cores but one on CUDA, 1 on CPU; 0: read in the main thread).")
@click.option("--scheduler", default=None, help="dask.distributed scheduler address: one task per slide on GPU workers.")
@click.option("--save-probabilities", is_flag=True, help="Also store the blended class probabilities (float16) in mask.zarr.")
@click.option("--background", default=None, help="Background class name [default: a class named background, else 0].")
@click.option("--export", "exports", default=",".join(DEFAULT_EXPORTS), show_default=True,
              help=f"Comma-separated exports written next to mask.zarr ({', '.join(EXPORTS)}; '' for none).")
@click.option("--clip-to-tissue/--no-clip-to-tissue", default=RunSettings.clip_to_tissue, show_default=True,
              help="Give pixels outside the tissue mask the background label, even inside a tissue window.")
@click.option("--tissue", default=RunSettings.tissue, show_default=True,
              help="auto (detect), all (the whole image), or a PNG/GeoJSON tissue mask of the slide.")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="The PFM weights the checkpoint was trained on [default: model.pfm_weights_path of the config].")
@click.option("--random-weights", is_flag=True, help="Allow an untrained PFM backbone (tests, benchmarks).")
@click.option("--skip-errors", is_flag=True, help="Go on past slides that fail, and list them at the end.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def segment_command(
    slides: tuple[Path, ...], checkpoint: Path, out: Path, scheduler: str | None, exports: str, skip_errors: bool,
    **options: Any,
) -> None:
    """Segment SLIDES (slide files, images with --slide-mpp, or `wsiseg tile` stores) into label masks."""
    from wsiseg.driver import check_results, summary_table
    from wsiseg.engine.segment import segment_slides
    from wsiseg.progress import setup_console_logging

    setup_console_logging()
    results = segment_slides(
        list(slides), checkpoint, out, skip_errors=skip_errors, scheduler=scheduler,
        exports=tuple(e.strip() for e in exports.split(",") if e.strip()), **options,
    )
    click.echo(summary_table(results, "windows"))
    check_results(results)


@click.command("export")
@click.argument("mask", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice([*EXPORTS, LABELS]), required=True,
              help="labels: an OME-Zarr label image inside the tile store MASK was segmented from.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help=f"Output [default: {either(map(EXPORTS.detail, EXPORTS))} next "
                   "to MASK; STORE.zarr/labels/segmentation for labels].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--level", type=int, default=None,
              help="GeoJSON: pyramid level to trace [default: the finest of at most 25 Mpx].")
@click.option("--simplify", type=float, default=0.0, show_default=True,
              help="GeoJSON: simplification tolerance in µm (0 = off: polygons follow the pixel edges exactly).")
@click.option("--min-area", type=float, default=0.0, show_default=True,
              help="GeoJSON: merge regions smaller than this many µm² into their neighbour.")
def export_command(
    mask: Path, fmt: str, out: Path | None, overwrite: bool, level: int | None, simplify: float, min_area: float
) -> None:
    """Export a mask.zarr as a pyramidal TIFF, OME-TIFF, GeoJSON polygons or an overlay PNG."""
    from wsiseg.export.mask import export_mask

    click.echo(str(export_mask(mask, fmt, out, overwrite=overwrite, level=level, simplify=simplify, min_area=min_area)))


@click.command("eval")
@click.argument("mask", type=click.Path(path_type=Path))
@click.option("--annotations", type=click.Path(path_type=Path), required=True,
              help="Folder of annotated tiles (PNG + JSON of slide coordinates) or a GeoJSON of class polygons.")
@click.option("--json", "as_json", is_flag=True, help="Print all metrics as JSON.")
def eval_command(mask: Path, annotations: Path, as_json: bool) -> None:
    """Compare a mask.zarr with annotations: Dice, IoU and the rest of the trainer's metrics."""
    from wsiseg.engine.evaluate import evaluate_mask

    result = evaluate_mask(mask, annotations)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    metrics = result["metrics"]
    click.echo(f"{result['regions']} annotated region(s), {metrics['pixels']:,} pixels")
    for name in ("mdice", "dice_no_bg", "miou", "pixel_acc", "kappa"):
        click.echo(f"{name:<12}{metrics[name]:.4f}")
    click.echo("per class      dice     iou  support")
    for index, name in enumerate(result["class_names"]):
        per = metrics["per_class"]
        click.echo(f"  {name:<12}{per['dice'][index]:>6.3f}  {per['iou'][index]:>6.3f}  {per['support'][index]:>7}")
