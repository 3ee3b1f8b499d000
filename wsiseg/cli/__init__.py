"""The `wsiseg` command line: a lazy click group whose commands are thin wrappers of the API.

Each command lives in a module of this package and is imported only when it runs, so
`wsiseg --help` stays instant (no torch, timm or peft at start-up).
"""

from __future__ import annotations

import errno
import importlib
import sys

import click

from wsiseg.errors import WsisegError

# command name -> (module in wsiseg.cli, attribute, one-line help shown by `wsiseg --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("demo", "demo_command", "Run every stage on the built-in real samples (the README's main job)."),
    "doctor": ("demo", "doctor_command", "Preflight checks: torch/CUDA, OpenSlide, codecs, cache, disk, a config's weights."),
    "models": ("models", "models_command", "List the backbone registry (embed dim, patch, normalisation, size)."),
    "merge": ("models", "merge_command", "Export a LoRA/DoRA checkpoint as a plain merged model."),
    "samples": ("samples", "samples_command", "Fetch the real sample slides, images and weights into the cache."),
    "fseg": ("fseg", "fseg_command", "Unsupervised segmentation: project token features onto a concept bank (F-Seg)."),
    "fseg-fit": ("fseg", "fseg_fit_command", "Fit F-Seg concept banks (k-means of token features, several k at once)."),
    "train": ("train", "train_command", "Train a segmenter from a YAML config (reference JSON dataset)."),
    "infer": ("train", "infer_command", "Segment the images of a dataset JSON with a trained checkpoint."),
    "config": ("config", "config_command", "Config tools: `config migrate` writes the native form of a reference config."),
    "info": ("slides", "info_command", "Show a slide's format, levels, MPP and associated images."),
    "tile": ("slides", "tile_command", "Tissue-mask slides and tile them into zarr stores."),
    "segment": ("segment", "segment_command", "Segment whole slides with a trained checkpoint (mask.zarr, TIFF, overlay)."),
    "export": ("segment", "export_command", "Export a mask.zarr as pyramidal TIFF, OME-TIFF, GeoJSON or overlay PNG."),
    "eval": ("segment", "eval_command", "Score a mask.zarr against annotated tiles or GeoJSON class polygons."),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"wsiseg.cli.{module}"), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wsiseg")
def cli() -> None:
    """Segment whole-slide pathology images with pathology foundation models."""


# errno -> what to say; every other OSError is a bug and keeps its traceback
OS_ERRORS: dict[int, str] = {
    errno.ENOSPC: "no space left on the device{where}: free some space or choose another --out",
    errno.EDQUOT: "disk quota exceeded{where}: free some space or choose another --out",
    errno.EACCES: "permission denied{where}: choose a folder you can write to (--out), or fix its permissions",
    errno.EPERM: "operation not permitted{where}: choose a folder you can write to (--out), or fix its permissions",
    errno.EROFS: "read-only file system{where}: choose a writable --out",
    errno.EIO: "input/output error{where}: check the disk or network share, then rerun",
}
RESUMES = "rerun the same command to resume where it stopped"
TRAIN_RESUMES = ("continue the run with --resume <output_dir>/checkpoints/last.pth (or, if it has no last.pth "
                 "yet, rerun the same command: it starts over)")


def resume_advice(argv: list[str] | None) -> str:
    """How to pick up after an interruption: most commands resume by themselves, train needs --resume."""
    args = sys.argv[1:] if argv is None else argv
    return TRAIN_RESUMES if "train" in args[:1] else RESUMES


def one_line(error: BaseException) -> str:
    """The user-facing line of an error; a reader process's error wrapped by torch keeps only its own message."""
    message = str(error)
    if "Original Traceback" in message:
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return message


def os_error_line(error: OSError, advice: str = RESUMES) -> str | None:
    """One line for an OS-level failure (disk full, permission denied, read-only), or None for others."""
    template = OS_ERRORS.get(error.errno or -1)
    if template is None:
        return None
    where = f" ({error.filename})" if error.filename else ""
    line = template.format(where=where)
    return f"{line}; then {advice}" if error.errno in (errno.ENOSPC, errno.EDQUOT) else line


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors, OS-level failures and Ctrl-C into one line."""
    try:
        cli.main(args=argv, prog_name="wsiseg", standalone_mode=False)
    except WsisegError as error:
        click.echo(f"Error: {one_line(error)}", err=True)
        sys.exit(2)
    except OSError as error:
        line = os_error_line(error, resume_advice(argv))
        if line is None:
            raise
        click.echo(f"Error: {line}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo(f"Interrupted: {resume_advice(argv)}.", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
