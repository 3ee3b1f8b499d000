"""`wsiseg train` and `wsiseg infer`: supervised training and patch-level inference (reference formats)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from wsiseg.engine.choices import BLENDS, PREDICTION_MODES
from wsiseg.engine.image import ImageInference


@click.command("train")
@click.argument("arguments", nargs=-1, metavar="[CONFIG]")
@click.option("--config", "config_option", type=click.Path(path_type=Path), default=None,
              help="The YAML config (native or the reference dialect); the same as the CONFIG argument.")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue a run from its checkpoints/last.pth (weights, optimiser, schedule, epoch, RNG).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (overrides system.device).")
@click.option("--options", "options", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override any config key, the value read as YAML (e.g. --options training.epochs=5 "
                   "model.finetune_mode.rank=8); several may follow one --options.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in logging.output_dir.")
def train_command(arguments: tuple[str, ...], config_option: Path | None,
                  resume: Path | None, device: str | None, options: tuple[str, ...], overwrite: bool) -> None:
    """Train a segmenter from a YAML config (see configs/; configs/demo.yaml runs on a CPU)."""
    from wsiseg.errors import WsisegError
    from wsiseg.progress import setup_console_logging
    from wsiseg.train.trainer import train_model

    overrides = [value for value in arguments if "=" in value]
    paths = [Path(value) for value in arguments if "=" not in value]
    if overrides and not options:
        raise WsisegError(f"{overrides[0]!r} looks like an override: put --options before it")
    if config_option is not None:
        paths.insert(0, config_option)
    if len(paths) != 1:
        raise WsisegError("give one config: wsiseg train CONFIG or wsiseg train --config CONFIG"
                          + (f" (got {', '.join(map(str, paths))})" if paths else ""))
    setup_console_logging()
    summary = train_model(paths[0], resume=resume, device=device, overwrite=overwrite,
                          options=[*options, *overrides])
    best = summary["best"]
    shown = f"{best:.4f}" if best is not None else "n/a"
    click.echo(f"best {summary['metric']} {shown} at epoch {summary['best_epoch']}; "
               f"run in {summary['output_dir']} (checkpoints/best_model.pth)")


@click.command("infer")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="The training YAML (optional: the checkpoint stores its config).")
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="A checkpoint from `wsiseg train` (or a run or checkpoints folder holding best_model.pth).")
@click.option("--input_json", "--input-json", "input_json", type=click.Path(path_type=Path), required=True,
              help="Dataset JSON; the images of --split are segmented (masks optional).")
@click.option("--output_dir", "--output-dir", "output_dir", type=click.Path(path_type=Path), required=True,
              help="Folder receiving predictions_masks/, predictions_overlays/ and metrics.json.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--input_size", "--input-size", "input_size", type=int, default=None,
              help="Window (or resized longer side) in pixels [default: model.input_size of the checkpoint].")
@click.option("--resize_or_windowslide", "--mode", "mode", type=click.Choice(PREDICTION_MODES.names),
              default=ImageInference.mode, show_default=True, help="Sliding windows, or one resized pass per image.")
@click.option("--batch_size", "--batch-size", "batch_size", type=int, default=ImageInference.batch_size, show_default=True,
              help="Windows per forward pass.")
@click.option("--overlap", type=float, default=ImageInference.overlap, show_default=True,
              help="Window overlap fraction in [0, 1).")
@click.option("--blend", type=click.Choice(BLENDS.names), default=ImageInference.blend, show_default=True,
              help="Window weights for blending overlapping predictions.")
@click.option("--split", default="test", show_default=True, help="Which list of the JSON to segment.")
@click.option("--bootstrap", type=int, default=0, show_default=True,
              help="Bootstrap resamples for 95% confidence intervals in metrics.json (0 = none).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def infer_command(**options: Any) -> None:
    """Segment the images of a dataset JSON split with a trained checkpoint."""
    from wsiseg.engine.image import ImageInference
    from wsiseg.metrics import format_metrics
    from wsiseg.progress import setup_console_logging
    from wsiseg.train.infer import infer_images

    inference = ImageInference(mode=options.pop("mode"), size=options.pop("input_size"),
                               overlap=options.pop("overlap"), blend=options.pop("blend"),
                               batch_size=options.pop("batch_size"))
    setup_console_logging()
    summary = infer_images(inference=inference, **options)
    line = f"{summary['images']} images in {summary['seconds']:.1f} s -> {summary['output_dir']}"
    if summary["metrics"]:
        line += " | " + format_metrics(summary["metrics"], ("mdice", "dice_no_bg", "dice_foreground", "miou", "pixel_acc"))
    click.echo(line)
