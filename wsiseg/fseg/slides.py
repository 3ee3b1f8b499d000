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
from wsiseg.errors import WsisegError
from wsiseg.fseg.api import BANK_NAME, DEFAULT_MPP, DEFAULT_WINDOW, fit_concepts, fseg_slide
from wsiseg.fseg.features import DEFAULT_LAYER, DEFAULT_MODEL
from wsiseg.locks import output_lock
from wsiseg.progress import get_logger

log = get_logger("fseg")


def shared_bank(
    slides: list[Path], out: Path, k: int, model: str | None, weights: str | Path | None, layer: int | None,
    mpp: float | None, slide_mpp: float | None, window: int | None, fit_windows: int, seed: int, device: str,
    tissue: str | Path = "auto", random_weights: bool = False,
) -> Path:
    """The bank fitted on all `slides` at <out>/concepts.safetensors: reused when it answers the same request."""
    from wsiseg.fseg.concepts import load_bank, save_bank

    request = json.loads(json.dumps({
        "slides": [str(path.resolve()) for path in slides], "k": k, "model": model or DEFAULT_MODEL,
        "weights": str(weights) if weights else None, "layer": DEFAULT_LAYER if layer is None else layer,
        "mpp": mpp or DEFAULT_MPP, "window": window or DEFAULT_WINDOW, "fit_windows": fit_windows, "seed": seed,
        "tissue": str(tissue),
    }))
    path = out / BANK_NAME
    if path.is_file():
        try:
            if load_bank(path).extra.get("request") == request:
                log.info("reusing the concept bank %s fitted by an earlier run", path)
                return path
        except WsisegError:
            pass  # unreadable: fitted again below
    bank = fit_concepts(slides, None, ks=[k], model=request["model"], weights=weights, layer=request["layer"],
                        mpp=request["mpp"], slide_mpp=slide_mpp, window=request["window"], max_windows=fit_windows,
                        device=device, seed=seed, tissue=tissue, random_weights=random_weights)
    bank.extra["request"] = request
    out.mkdir(parents=True, exist_ok=True)
    save_bank(bank, path, overwrite=True)
    log.info("fitted k=%d concepts on the slide(s): saved as %s (reuse it with --bank)", k, path)
    return path


def _opens(path: Path, mpp: float | None, slide_mpp: float | None) -> bool:
    """Whether a slide opens at `mpp` (with --skip-errors, a bad slide stays out of the shared fit;
    its own task then reports its error)."""
    from wsiseg.engine.source import open_source

    try:
        view = open_source(path, mpp or DEFAULT_MPP, slide_mpp)
    except WsisegError:
        return False
    view.reader.close()
    return True


def _fseg_one(slide: Path, out: Path, options: dict[str, Any]) -> SlideResult:
    """One slide with the shared bank, here or as a dask task."""
    summary = fseg_slide(slide, out, **options)[0]
    return SlideResult.from_summary(slide, out, summary)


def fseg_slides(
    slides: list[str | Path],
    out: str | Path,
    k: int = 8,
    bank: str | Path | None = None,
    model: str | None = None,
    weights: str | Path | None = None,
    layer: int | None = None,
    mpp: float | None = None,
    slide_mpp: float | None = None,
    window: int | None = None,
    device: str = "auto",
    fit_windows: int = 64,
    seed: int = 0,
    tissue: str | Path = "auto",
    random_weights: bool = False,
    scheduler: str | None = None,
    skip_errors: bool = False,
    **options: Any,
) -> list[SlideResult]:
    """F-Seg several slides, each into its folder (`slide_outputs`); one SlideResult per slide.

    `options` go to `fseg_slide` (mode, overlap, batch_size, workers, overwrite, exports, ...).
    Slides finished by an earlier run with the same settings are skipped. With `scheduler`,
    each slide is a task (asking for a `GPU` resource when `device` is explicitly cuda*); the
    bank is fitted here first. The output folder is locked for the run.
    """
    paths = [Path(s) for s in slides]
    if not paths:
        raise WsisegError("no slide given: pass at least one slide path")
    out = Path(out)
    outputs = slide_outputs(paths, out)
    on_gpu = str(device or "auto").startswith("cuda")
    with output_lock(out, "fseg"):
        if bank is None:
            fit_on = [path for path in paths if _opens(path, mpp, slide_mpp)] if skip_errors else paths
            bank = shared_bank(fit_on or paths, out, k, model, weights, layer, mpp, slide_mpp, window, fit_windows,
                               seed, device, tissue, random_weights)
        options = {**options, "k": k, "bank": str(bank), "model": model, "weights": weights, "layer": layer,
                   "mpp": mpp, "slide_mpp": slide_mpp, "window": window, "device": device, "tissue": tissue,
                   "random_weights": random_weights}
        if scheduler:
            options["show_progress"] = False
        with dask_client(scheduler) as client:
            if client is not None and on_gpu:
                require_gpu_workers(client, scheduler)
            return run_slides(paths, outputs, partial(_fseg_one, options=options), skip_errors=skip_errors,
                              client=client, resources={"GPU": 1} if on_gpu else None)
