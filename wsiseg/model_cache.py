"""The model this process loaded last, kept for the next slide that asks for the same one.

A multi-slide run and each dask worker then load a model once, not once per slide. Only the
last model is kept, so a process holds one model at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

Model = TypeVar("Model")

_LAST: dict[str, Any] = {}


def file_stamp(path: str | Path | None) -> list[Any] | None:
    """A file's (or folder's) resolved path and modification time, so a replaced file is loaded again."""
    if path is None:
        return None
    path = Path(path)
    return [str(path.resolve()), path.stat().st_mtime_ns if path.exists() else None]


def last_loaded(key: list[Any], load: Callable[[], Model]) -> Model:
    """`load()`, or what it gave when this process last called it with an equal `key`."""
    text = json.dumps(key, default=str)
    if text not in _LAST:
        _LAST.clear()  # the previous model goes before the next one loads
        _LAST[text] = load()
    return _LAST[text]
