"""Checks made before torch, a model or a cluster is loaded, so a user error arrives within a second.

`segment` and `fseg` call these first: every input opens and has an MPP, every output can be
written (the options were checked when their `RunSettings` was built). What they accept here, the
run accepts later.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from wsiseg.errors import WsisegError


def check_file(path: str | Path | None, what: str, hint: str) -> None:
    """A WsisegError naming `what` and `hint` unless `path` (when given) is an existing file or folder."""
    if path is not None and not Path(path).exists():
        raise WsisegError(f"no such {what}: {path}; {hint}")


def check_source(path: str | Path, slide_mpp: float | None = None, mpp: float | None = None) -> None:
    """The slide file or tile store at `path` opens and has a resolution (its metadata or `slide_mpp`);
    a tile store also holds the run's `mpp`, when that is known already."""
    path = Path(path)
    if not path.exists():  # before the slide readers are even imported
        raise WsisegError(f"no such slide file: {path}; check the path")
    from wsiseg.engine.source import is_tile_store

    if is_tile_store(path):
        from wsiseg.store.tiles import TileStore

        store = TileStore.open(path)
        if mpp is not None:  # else the checkpoint's MPP, not read yet
            store.size_at(mpp)
        return
    from wsiseg.slide import open_slide

    with open_slide(path, slide_mpp) as slide:
        slide.mpp  # noqa: B018 - raises when the slide has no MPP and none was passed


def check_outputs(folders: Sequence[Path]) -> None:
    """Every slide's folder can be written.

    Outputs already there are judged by the run (`finished_run`): a finished run with the same
    settings is skipped, one with other settings refused without `overwrite`.
    """
    from wsiseg.engine.run import SUMMARY_NAME
    from wsiseg.outputs import check_writable

    for folder in folders:
        check_writable(Path(folder) / SUMMARY_NAME, overwrite=True)


def needs_weights(model: str) -> bool:
    """Whether `model` is a registry PFM whose weights the user must supply (it ships no default weights).

    `timm:<architecture>` backbones are generic architectures, not PFMs: they may run on random weights.
    """
    from wsiseg.models.registry import entry

    return not model.startswith("timm:") and entry(model).default_weights is None


def check_weights(model: str, weights: str | Path | None, random_weights: bool = False) -> None:
    """Refuse to run a registry PFM on random weights unless asked to (`--random-weights`)."""
    if weights is not None:
        check_file(weights, "weights file", f"pass the {model} weights you downloaded to --weights")
        return
    if needs_weights(model) and not random_weights:
        raise WsisegError(
            f"{model} needs its pretrained weights: pass the downloaded weights file or folder with --weights "
            "(or --random-weights to run it untrained, for tests and benchmarks only)"
        )
