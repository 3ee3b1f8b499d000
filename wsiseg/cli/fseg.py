"""`wsiseg fseg` and `wsiseg fseg-fit`: unsupervised segmentation by concept projection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from wsiseg.engine.settings import RunSettings
from wsiseg.fseg.features import DEFAULT_LAYER, DEFAULT_MODEL
from wsiseg.fseg.modes import MODES
from wsiseg.fseg.options import DEFAULT_BATCH_SIZE, DEFAULT_KS, DEFAULT_MPP, DEFAULT_WINDOW, FsegOptions


def split_k_values(slides: tuple[Path, ...], ks: tuple[str, ...]) -> tuple[list[Path], list[int]]:
    """Separate `--k 8 16 32` (click hands the values after the first to the slide arguments) from slides.

    A bare integer argument that is not an existing file is a k value; `--k 8,16` works too.
    """
    values = [part for value in ks for part in value.split(",") if part.strip()]
    paths = []
    for slide in slides:
        if ks and str(slide).isdigit() and not slide.exists():
            values.append(str(slide))
        else:
            paths.append(slide)
    try:
        return paths, [int(v) for v in values]
    except ValueError:
        raise click.BadParameter(f"k values must be integers, got {' '.join(values)}", param_hint="--k") from None


@click.command("fseg")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder (one sub-folder per slide when several).")
@click.option("--k", "k", type=int, default=FsegOptions.k, show_default=True, help="Number of concepts.")
@click.option("--model", default=None, help="Backbone (default: the bank's, else efficientnet_lite0_imagenet).")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Backbone weights file or folder.")
@click.option("--bank", type=click.Path(path_type=Path), default=None,
              help="Concept bank (wsiseg fseg-fit output or F-Seg joblib); without it k concepts are fitted on the slides.")
@click.option("--mode", type=click.Choice(tuple(MODES)), default=FsegOptions.mode, show_default=True,
              help="project: NNLS weights; nearest: cosine similarity; nmf: per-window factorisation matched to the bank.")
@click.option("--scale-before-argmax", is_flag=True, help="Divide each concept's weight map by its maximum in the window.")
@click.option("--layer", type=int, default=None, help="Block (ViT) or stage (CNN) index; default the bank's, else the last.")
@click.option("--mpp", type=float, default=None, help="Segmentation resolution in µm/px (default the bank's, else 0.5).")
@click.option("--slide-mpp", type=float, default=None, help="Override the slide's base µm/px (needed for plain images).")
@click.option("--window", type=int, default=None, help="Window side in pixels (default the bank's, else 512).")
@click.option("--overlap", type=float, default=RunSettings.overlap, show_default=True, help="Window overlap fraction.")
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True)
@click.option("--device", default=RunSettings.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--clip-to-tissue/--no-clip-to-tissue", default=RunSettings.clip_to_tissue, show_default=True,
              help="Give pixels outside the tissue mask the background label, even inside a tissue window.")
@click.option("--tissue", default=RunSettings.tissue, show_default=True,
              help="auto (detect), all (the whole image), or a PNG/GeoJSON tissue mask of the slide.")
@click.option("--random-weights", is_flag=True, help="Run a registry PFM without --weights, untrained (tests, benchmarks).")
@click.option("--workers", default=RunSettings.workers, show_default=True,
              help="Reader threads (auto: all cores but one on CUDA, 1 on CPU; 0: read in the main thread).")
@click.option("--scheduler", default=None, help="dask.distributed scheduler address: one task per slide.")
@click.option("--skip-errors", is_flag=True, help="Go on past slides that fail, and list them at the end.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def fseg_command(slides: tuple[Path, ...], out: Path, scheduler: str | None, skip_errors: bool, **options: Any) -> None:
    """Segment slides into k concepts by projecting token features onto a concept bank."""
    from wsiseg.driver import check_results, summary_table
    from wsiseg.fseg.slides import fseg_slides
    from wsiseg.progress import setup_console_logging

    setup_console_logging()
    results = fseg_slides(list(slides), out, scheduler=scheduler, skip_errors=skip_errors, **options)
    click.echo(summary_table(results, "windows"))
    check_results(results)


@click.command("fseg-fit")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bank file to write (.safetensors).")
@click.option("--k", "ks", multiple=True, help="k values: --k 8 16 32 64 (or --k 8,16); default 8 16 32 64.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Backbone.")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Backbone weights file or folder.")
@click.option("--layer", type=int, default=DEFAULT_LAYER, show_default=True, help="Block (ViT) or stage (CNN) index.")
@click.option("--mpp", type=float, default=DEFAULT_MPP, show_default=True, help="Resolution in µm/px.")
@click.option("--slide-mpp", type=float, default=None, help="Override the slides' base µm/px.")
@click.option("--window", type=int, default=DEFAULT_WINDOW, show_default=True, help="Window side in pixels.")
@click.option("--max-windows", type=int, default=64, show_default=True, help="Tissue windows sampled (all slides).")
@click.option("--max-tokens", type=int, default=50_000, show_default=True, help="Token features kept for k-means.")
@click.option("--device", default=RunSettings.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=FsegOptions.seed, show_default=True)
@click.option("--tissue", default=RunSettings.tissue, show_default=True,
              help="auto (detect), all (the whole image), or a PNG/GeoJSON tissue mask of the slide.")
@click.option("--random-weights", is_flag=True, help="Run a registry PFM without --weights, untrained (tests, benchmarks).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bank.")
def fseg_fit_command(slides: tuple[Path, ...], out: Path, ks: tuple[str, ...], **options: Any) -> None:
    """Fit concept banks (k-means of token features, several k in one pass) on the tissue of slides."""
    from wsiseg.fseg.api import fit_concepts
    from wsiseg.progress import setup_console_logging

    setup_console_logging()
    paths, k_values = split_k_values(slides, ks)
    if not paths:
        raise click.UsageError("give at least one slide")
    bank = fit_concepts(paths, out, ks=k_values or list(DEFAULT_KS), **options)
    click.echo(f"{out}: k = {', '.join(map(str, bank.ks))}, {bank.feature_dim} features, model {bank.model}, layer {bank.layer}")
