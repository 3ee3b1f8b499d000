"""What a slide run is asked to do, as one frozen object built and checked once at the boundary.

`RunSettings` holds every option the slide loop takes (MPP, window, overlap, blend, batch,
readers, device, tissue, exports, ...) with its default, written here only. The CLI, the Python
API (`segment_slide`, `fseg_slide`, `run_slide`) and the multi-slide drivers build one with
`RunSettings.build(settings, **options)`, which refuses an unknown name or a value out of range
with the same messages the command line gives, before anything is opened or loaded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from wsiseg.choices import either
from wsiseg.engine.choices import BLENDS, PREDICTION_MODES
from wsiseg.errors import WsisegError
from wsiseg.export.choices import DEFAULT_EXPORTS, EXPORTS

BACKGROUND_NAMES = ("background", "bg", "other", "none")

T = TypeVar("T")


@dataclass(frozen=True)
class RunSettings:
    """The options of one slide run. `mpp` and `window` left None are the model's (config or bank).

    `background`: a class index or name, None for a class named like background (else 0).
    `chunk` is the side of the mask store's chunks, also the granularity of resuming.
    """

    mode: str = "windowslide"
    mpp: float | None = None
    slide_mpp: float | None = None
    window: int | None = None
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int = 16
    workers: int | str = "auto"
    device: str = "auto"
    exports: tuple[str, ...] = DEFAULT_EXPORTS
    clip_to_tissue: bool = True
    tissue: str | Path = "auto"
    background: int | str | None = None
    save_probabilities: bool = False
    overwrite: bool = False
    show_progress: bool = True
    chunk: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "exports", tuple(self.exports))
        object.__setattr__(self, "device", "auto" if self.device is None else str(self.device))
        self.check()

    def check(self) -> None:
        """Refuse a value the run cannot take, without opening anything."""
        from wsiseg.engine.loader import parse_workers
        from wsiseg.slide.mask import check_tissue_option

        if self.mode not in PREDICTION_MODES:
            raise WsisegError(f"unknown mode {self.mode!r}: use {either(PREDICTION_MODES)}")
        if self.blend not in BLENDS:
            raise WsisegError(f"unknown blend {self.blend!r}: use {either(BLENDS)}")
        if not 0 <= self.overlap < 1:
            raise WsisegError(f"--overlap must be a fraction of the window in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise WsisegError(f"--batch-size must be at least 1, got {self.batch_size}")
        parse_workers(self.workers, "cpu")
        check_positive("--mpp", self.mpp)
        check_positive("--slide-mpp", self.slide_mpp)
        if self.window is not None and self.window < 1:
            raise WsisegError(f"--window must be at least 1 pixel, got {self.window}")
        check_tissue_option(self.tissue)
        check_exports(self.exports)

    @classmethod
    def build(cls, settings: RunSettings | None = None, **options: Any) -> RunSettings:
        """`settings` (default: all defaults) with `options` replacing fields of the same name."""
        return build(cls, settings, options)

    def replace(self, **changes: Any) -> RunSettings:
        """A copy with `changes`, checked again."""
        return build(RunSettings, self, changes)


def build(kind: type[T], base: T | None, options: dict[str, Any]) -> T:
    """`base` (or a default `kind`) with `options` replaced; an unknown name is a WsisegError."""
    (fields,) = split_options(options, kind)
    if base is None:
        return kind(**fields)
    return dataclasses.replace(base, **fields) if fields else base  # type: ignore[type-var]


def split_options(options: dict[str, Any], *kinds: type) -> list[dict[str, Any]]:
    """`options` sorted by the dataclass (of `kinds`) having a field of that name, the first one
    where several do; unknown names are a WsisegError listing the valid ones."""
    names = [{field.name for field in dataclasses.fields(kind)} for kind in kinds]
    unknown = sorted(set(options).difference(*names))
    if unknown:
        raise WsisegError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                          f"use any of {', '.join(sorted(set().union(*names)))}")
    return [{key: value for key, value in options.items()
             if key in fields and not any(key in earlier for earlier in names[:index])}
            for index, fields in enumerate(names)]


def check_positive(name: str, value: float | None) -> None:
    """A WsisegError unless `value` is None or a finite positive number."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise WsisegError(f"{name} must be a positive number, got {value}")


def check_exports(exports: Sequence[str]) -> None:
    """Every export is a registered format."""
    for fmt in exports:
        if fmt not in EXPORTS:
            raise WsisegError(f"unknown export format {fmt!r}: use any of {', '.join(EXPORTS)}")


def background_label(class_names: Sequence[str], background: int | str | None = None) -> int:
    """The label of background: given by index or name, else a class named like background, else 0."""
    if isinstance(background, str) and background.isdigit():
        background = int(background)
    if isinstance(background, int):
        if not 0 <= background < len(class_names):
            count = len(class_names)
            raise WsisegError(f"background label {background} is not one of the {count} classes (0..{count - 1})")
        return background
    if isinstance(background, str):
        if background not in class_names:
            raise WsisegError(f"background class {background!r} is not one of {', '.join(class_names)}")
        return list(class_names).index(background)
    lowered = [name.lower() for name in class_names]
    return next((lowered.index(name) for name in BACKGROUND_NAMES if name in lowered), 0)
