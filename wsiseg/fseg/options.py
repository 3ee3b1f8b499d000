"""What an F-Seg run is asked for beyond the slide loop's `RunSettings`: concepts, bank, backbone, mode.

Written once here with their defaults, for `fseg`, `fseg-fit` and their Python API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg.engine.settings import RunSettings, build, split_options
from wsiseg.errors import WsisegError
from wsiseg.fseg.modes import MODES

DEFAULT_KS = (8, 16, 32, 64)
DEFAULT_MPP = 0.5
DEFAULT_WINDOW = 512
DEFAULT_BATCH_SIZE = 8  # token features of a PFM take more memory per window than a segmenter's scores
BANK_NAME = "concepts.safetensors"


@dataclass(frozen=True)
class FsegOptions:
    """The concepts (k of a `bank`, or fitted on `fit_windows` windows with `seed`), the backbone
    (`model`, `weights`, `layer`; None: the bank's, else the defaults) and the projection `mode`."""

    k: int = 8
    bank: Any = None  # a path or a loaded ConceptBank
    model: str | None = None
    weights: str | Path | None = None
    layer: int | None = None
    mode: str = "project"
    scale_before_argmax: bool = False
    fit_windows: int = 64
    seed: int = 0
    random_weights: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise WsisegError(f"unknown --mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.k < 1:
            raise WsisegError(f"--k must be a positive integer, got {self.k}")

    def replace(self, **changes: Any) -> FsegOptions:
        """A copy with `changes`, checked again."""
        return build(FsegOptions, self, changes)


def fseg_request(
    settings: RunSettings | None, fseg: FsegOptions | None, options: dict[str, Any]
) -> tuple[RunSettings, FsegOptions]:
    """The run settings and F-Seg options of a call, `options` overriding fields of either by name
    (`mode` is the F-Seg mode). Without `settings`, the F-Seg defaults (batch size) apply."""
    fseg_fields, run_fields = split_options(options, FsegOptions, RunSettings)
    base = settings if settings is not None else RunSettings(batch_size=DEFAULT_BATCH_SIZE)
    return base.replace(**run_fields), build(FsegOptions, fseg, fseg_fields)


def with_defaults(settings: RunSettings, fseg: FsegOptions) -> tuple[RunSettings, FsegOptions]:
    """Backbone, layer, MPP and window left open (by the call and the bank) set to the F-Seg defaults."""
    from wsiseg.fseg.features import DEFAULT_LAYER, DEFAULT_MODEL

    layer = DEFAULT_LAYER if fseg.layer is None else fseg.layer
    return (settings.replace(mpp=settings.mpp or DEFAULT_MPP, window=settings.window or DEFAULT_WINDOW),
            fseg.replace(model=fseg.model or DEFAULT_MODEL, layer=layer))
