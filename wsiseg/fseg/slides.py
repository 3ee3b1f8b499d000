"""`wsiseg fseg` over several slides: one concept bank for all of them, then one slide per task.

Without a bank, k concepts are fitted once on the tissue of all the slides (so labels agree
across them) and saved as <out>/concepts.safetensors; a rerun with the same request reuses
it. Each slide is then `fseg_slide` with that bank, here or as a dask task (`scheduler`).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from wsiseg.driver import SlideResult, dask_client, require_gpu_workers, run_slides, slide_outputs
from wsiseg.engine.settings import RunSettings
from wsiseg.errors import WsisegError
from wsiseg.fseg.api import fit_concepts, fseg_slide
from wsiseg.fseg.options import BANK_NAME, FsegOptions, fseg_request, with_defaults
from wsiseg.locks import output_lock
from wsiseg.progress import get_logger
from wsiseg.slide.mask import tissue_request

log = get_logger("fseg")


def shared_bank(slides: list[Path], out: Path, settings: RunSettings, fseg: FsegOptions) -> Path:
    """The bank fitted on all `slides` at <out>/concepts.safetensors: reused when it answers the same request."""
    from wsiseg.fseg.concepts import load_bank, save_bank

    settings, fseg = with_defaults(settings, fseg)
    request = json.loads(json.dumps({
        "slides": [str(path.resolve()) for path in slides], "k": fseg.k, "model": fseg.model,
        "weights": str(fseg.weights) if fseg.weights else None, "layer": fseg.layer,
        "mpp": settings.mpp, "window": settings.window, "fit_windows": fseg.fit_windows, "seed": fseg.seed,
        "tissue": tissue_request(settings.tissue),
    }))
    path = out / BANK_NAME
    if path.is_file():
        try:
            if load_bank(path).extra.get("request") == request:
                log.info("reusing the concept bank %s fitted by an earlier run", path)
                return path
        except WsisegError:
            pass  # unreadable: fitted again below
    bank = fit_concepts(slides, None, ks=[fseg.k], max_windows=fseg.fit_windows, settings=settings, fseg=fseg)
    bank.extra["request"] = request
    out.mkdir(parents=True, exist_ok=True)
    save_bank(bank, path, overwrite=True)
    log.info("fitted k=%d concepts on the slide(s): saved as %s (reuse it with --bank)", fseg.k, path)
    return path


def _opens(path: Path, settings: RunSettings) -> bool:
    """Whether a slide opens at the settings' MPP (with --skip-errors, a bad slide stays out of the
    shared fit; its own task then reports its error)."""
    from wsiseg.engine.source import open_source

    try:
        view = open_source(path, settings.mpp, settings.slide_mpp)
    except WsisegError:
        return False
    view.reader.close()
    return True


def _fseg_one(slide: Path, out: Path, settings: RunSettings, fseg: FsegOptions) -> SlideResult:
    """One slide with the shared bank, here or as a dask task."""
    summary = fseg_slide(slide, out, settings, fseg)[0]
    return SlideResult.from_summary(slide, out, summary)


def fseg_slides(
    slides: list[str | Path],
    out: str | Path,
    settings: RunSettings | None = None,
    fseg: FsegOptions | None = None,
    scheduler: str | None = None,
    skip_errors: bool = False,
    **options: Any,
) -> list[SlideResult]:
    """F-Seg several slides, each into its folder (`slide_outputs`); one SlideResult per slide.

    `settings`, `fseg` and `options` as in `fseg_slide`. Slides finished by an earlier run with
    the same settings are skipped. With `scheduler`, each slide is a task (asking for a `GPU`
    resource when the device is explicitly cuda*); the bank is fitted here first. The output
    folder is locked for the run.
    """
    settings, fseg = fseg_request(settings, fseg, options)
    paths = [Path(s) for s in slides]
    if not paths:
        raise WsisegError("no slide given: pass at least one slide path")
    out = Path(out)
    outputs = slide_outputs(paths, out)
    on_gpu = settings.device.startswith("cuda")
    with output_lock(out, "fseg"):
        if fseg.bank is None:
            fit_at = with_defaults(settings, fseg)[0]
            fit_on = [path for path in paths if _opens(path, fit_at)] if skip_errors else paths
            fseg = fseg.replace(bank=str(shared_bank(fit_on or paths, out, settings, fseg)))
        if scheduler:
            settings = settings.replace(show_progress=False)
        with dask_client(scheduler) as client:
            if client is not None and on_gpu:
                require_gpu_workers(client, scheduler)
            return run_slides(paths, outputs, partial(_fseg_one, settings=settings, fseg=fseg),
                              skip_errors=skip_errors, client=client, resources={"GPU": 1} if on_gpu else None)
