"""The multi-slide driver of `tile`, `segment` and `fseg`: output names, a dask client, per-slide results.

One rule names per-slide outputs (`slide_outputs`), one type records what happened to each
slide (`SlideResult`) and one table reports it (`summary_table`). `run_slides` runs one
function per slide, here one after another, or as one dask task per slide on an existing
cluster (`dask_client`); with `skip_errors` a slide's user error is recorded and the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsiseg.errors import WsisegError
from wsiseg.progress import get_logger

log = get_logger("driver")

DOUBLE_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr")
STATUSES = ("done", "skipped", "empty", "failed")


@dataclass
class SlideResult:
    """What happened to one slide: done, skipped (finished by an earlier run), empty (no tissue) or failed."""

    slide: Path
    out: Path
    status: str
    size: tuple[int, int] = (0, 0)
    count: int = 0  # tiles written or windows segmented
    rate: float | None = None  # of `count`, per second
    seconds: float = 0.0
    message: str = ""  # the error of a failed slide
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    @classmethod
    def from_summary(cls, slide: Path | str, out: Path | str, summary: dict[str, Any]) -> SlideResult:
        """The result of a slide segmented (or reused) by segment or fseg, from its summary.json."""
        return cls(Path(slide), Path(out), "skipped" if summary.get("reused") else "done",
                   (summary["width"], summary["height"]), summary["windows_tissue"], summary.get("tiles_per_s"),
                   summary=summary)


def parse_workers_option(value: int | str | None, auto: Callable[[], int], zero_means: str) -> int:
    """A --workers value: a count of 0 or more, or auto/None for `auto()`."""
    if value is None or value == "auto":
        return auto()
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise WsisegError(f"--workers must be a number or auto, got {value!r}") from None
    if count < 0:
        raise WsisegError(f"--workers must be 0 or more (0 = {zero_means}), got {count}")
    return count


def slide_name(path: Path | str) -> str:
    """A slide's name: its file (or store folder) name without its suffix, e.g. a.ome.tiff -> a, a.zarr -> a."""
    name = Path(path).name
    for suffix in DOUBLE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def slide_outputs(slides: Sequence[Path | str], out: Path | str, suffix: str = "") -> list[Path]:
    """Where each slide's output goes: `out` itself when it names one output, else out/<slide name><suffix>.

    `out` names one output when one slide is given and `out` ends with `suffix` (always true for
    the folders of segment and fseg, suffix ""; for tile stores, suffix ".zarr", `out` may be a folder).
    """
    out = Path(out)
    if suffix and out.suffix == suffix or not suffix and len(slides) == 1:
        if len(slides) != 1:
            raise WsisegError(f"--out {out} names one output but {len(slides)} slides were given: pass a folder")
        return [out]
    outputs: dict[Path, Path] = {}
    for slide in slides:
        target = out / f"{slide_name(slide)}{suffix}"
        if target in outputs:
            raise WsisegError(f"{slide} and {outputs[target]} would both be written to {target}: rename one of them")
        outputs[target] = Path(slide)
    return list(outputs)


@contextmanager
def dask_client(scheduler: str | None, local_workers: int = 0) -> Iterator[Any]:
    """A dask.distributed client of the existing cluster at `scheduler`, else of a local cluster of
    `local_workers` worker processes (needs loopback networking), else None (run in this process)."""
    if scheduler is None and not local_workers:
        yield None
        return
    from distributed import Client

    if scheduler is None:
        with _local_cluster(local_workers) as cluster, Client(cluster) as client:
            yield client
        return

    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as error:
        raise WsisegError(
            f"cannot reach the dask scheduler at {scheduler} ({error}): start one (`dask scheduler`) or drop --scheduler"
        ) from None
    with client:
        yield client


@contextmanager
def _local_cluster(workers: int) -> Iterator[Any]:
    import logging

    import dask
    from distributed import LocalCluster

    # The workers' statistical profiler samples every task thread 100 times a second: pure overhead here.
    with dask.config.set({"distributed.worker.profile.enabled": False}), LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
        scheduler_kwargs={"dashboard": False}, worker_dashboard_address=None, silence_logs=logging.ERROR,
    ) as cluster:
        yield cluster


def require_gpu_workers(client: Any, scheduler: str) -> None:
    """Refuse a cluster none of whose workers declares a GPU resource (the tasks would wait for ever)."""
    workers = client.scheduler_info().get("workers", {}).values()
    if not any(worker.get("resources", {}).get("GPU", 0) >= 1 for worker in workers):
        raise WsisegError(
            f"no worker of the dask cluster at {scheduler} has a GPU resource: start the workers with "
            "`--resources GPU=1`, or use --device auto or cpu"
        )


def _timed(work: Callable[[Path, Path], SlideResult], slide: Path, out: Path) -> SlideResult:
    started = time.perf_counter()
    result = work(slide, out)
    result.seconds = time.perf_counter() - started
    return result


def _failed(slide: Path, out: Path, error: WsisegError, skip_errors: bool) -> SlideResult:
    if not skip_errors:
        raise error
    log.error("%s: %s (skipped)", Path(slide).name, error)
    return SlideResult(Path(slide), Path(out), "failed", message=str(error))


def run_slides(
    slides: Sequence[Path],
    outputs: Sequence[Path],
    work: Callable[[Path, Path], SlideResult],
    *,
    skip_errors: bool = False,
    client: Any = None,
    resources: dict[str, float] | None = None,
) -> list[SlideResult]:
    """`work(slide, out)` for every slide: here in order, or one dask task each when `client` is given.

    With `skip_errors`, a slide's WsisegError is recorded as a failed result and the others go
    on; without, the first one stops the run. Other errors (a full disk, a bug) always stop it.
    """
    results: list[SlideResult] = []
    if client is None:
        for slide, out in zip(slides, outputs):
            try:
                results.append(_timed(work, slide, out))
            except WsisegError as error:
                results.append(_failed(slide, out, error, skip_errors))
        return results
    futures = [
        client.submit(_timed, work, Path(slide), Path(out), resources=resources, pure=False,
                      key=f"wsiseg-{slide_name(out)}-{index}-{time.time_ns()}")
        for index, (slide, out) in enumerate(zip(slides, outputs))
    ]
    try:
        for slide, out, future in zip(slides, outputs, futures):
            try:
                results.append(future.result())
            except WsisegError as error:
                results.append(_failed(slide, out, error, skip_errors))
    finally:
        for future in futures:
            future.cancel()
    return results


def summary_table(results: Sequence[SlideResult], unit: str) -> str:
    """The run's table: one row per slide (status, size, `unit` count and rate, seconds, output or error)."""
    header = ("slide", "status", "size", unit, f"{unit}/s", "seconds", "output / error")
    rows = [header]
    for r in results:
        rows.append((
            r.slide.name, r.status, f"{r.size[0]}x{r.size[1]}" if r.size != (0, 0) else "-",
            str(r.count) if r.status != "failed" else "-", f"{r.rate:.1f}" if r.rate else "-",
            f"{r.seconds:.1f}", r.message if r.status == "failed" else str(r.out),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows)


def check_results(results: Sequence[SlideResult]) -> None:
    """Fail the run (one line, after the table) when a slide failed."""
    failed = sum(not r.ok for r in results)
    if failed:
        raise WsisegError(
            f"{failed} of {len(results)} slides failed (see the table above); fix them and rerun: "
            "finished slides are skipped"
        )
