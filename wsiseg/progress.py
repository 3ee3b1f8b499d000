"""Progress bars with rate and ETA, and per-run log files."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import ProgressColumn, Task
from rich.text import Text

LOGGER_NAME = "wsiseg"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str = "") -> logging.Logger:
    """The project's logger, or a child of it."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def setup_console_logging(level: int = logging.INFO) -> None:
    """Log wsiseg messages to stderr once (called by the command line)."""
    logger = get_logger()
    logger.setLevel(min(level, logger.level or level))
    if not any(getattr(handler, "_wsiseg_console", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        handler.setLevel(level)
        handler._wsiseg_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


@contextmanager
def log_to_file(path: Path, level: int = logging.INFO) -> Iterator[Path]:
    """Append wsiseg log records to `path` for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(level)
    logger = get_logger()
    previous_level = logger.level
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        handler.close()


class RateColumn(ProgressColumn):
    """Items per second, with the unit of the task (tiles/s, windows/s, ...)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text("-" if speed is None else f"{speed:,.1f} {unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(
    total: int | None,
    description: str,
    unit: str = "tiles",
    disable: bool = False,
    fields: dict[str, str] | None = None,
) -> Iterator:
    """A progress bar on stderr with count, rate and ETA; yields `advance(n=1, **values)`.

    `fields` maps extra live values to their format (for example {"loss": ".4f"}); pass the
    new values to `advance` as keywords.
    """
    extra = [TextColumn(" ".join(f"{name} {{task.fields[{name}]:{spec}}}" for name, spec in fields.items()))] if fields else []
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        *extra,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=disable,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, unit=unit, **{name: float("nan") for name in fields or {}})

        def advance(n: int = 1, **values: float) -> None:
            progress.update(task, advance=n, **values)

        yield advance
