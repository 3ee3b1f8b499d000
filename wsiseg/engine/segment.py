"""`wsiseg.segment_slide` / `wsiseg segment`: a trained segmenter over whole slides.

The checkpoint (and optionally the training config) gives the model, the classes, the
segmentation MPP (`dataset.mpp`) and the window (`model.input_size`); everything after that is
`run_slide`. Several slides run one after another, or one task per slide on a dask.distributed
cluster (`scheduler`), each slide into its own folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from wsiseg.devices import resolve_device
from wsiseg.driver import SlideResult, dask_client, require_gpu_workers, run_slides, slide_outputs
from wsiseg.engine.run import DEFAULT_EXPORTS, run_slide
from wsiseg.errors import WsisegError
from wsiseg.locks import output_lock
from wsiseg.progress import get_logger

log = get_logger("segment")

BACKGROUND_NAMES = ("background", "bg", "other", "none")


def _load_config(config: dict[str, Any] | str | Path | None) -> dict[str, Any] | None:
    """The validated training config, or None."""
    if config is None or isinstance(config, dict):
        return config
    from wsiseg.config import load_config

    return load_config(config, splits=(), check_files=False)


def background_label(class_names: Sequence[str], background: int | str | None = None) -> int:
    """The label of background: given by index or name, else a class named like background, else 0."""
    if isinstance(background, str) and background.isdigit():
        background = int(background)
    if isinstance(background, int):
        if not 0 <= background < len(class_names):
            raise WsisegError(f"background label {background} is not one of the {len(class_names)} classes (0..{len(class_names) - 1})")
        return background
    if isinstance(background, str):
        if background not in class_names:
            raise WsisegError(f"background class {background!r} is not one of {', '.join(class_names)}")
        return list(class_names).index(background)
    lowered = [name.lower() for name in class_names]
    return next((lowered.index(name) for name in BACKGROUND_NAMES if name in lowered), 0)


def check_backbone_weights(payload: dict[str, Any], effective: dict[str, Any], random_weights: bool = False) -> None:
    """Refuse a checkpoint whose backbone must be rebuilt from PFM weights that are not given (or not there).

    A checkpoint that stores its whole backbone needs none; one that stores only an adapter (or
    nothing, for a frozen backbone) is rebuilt from `model.pfm_weights_path`, or `--weights`.
    """
    from wsiseg.engine.preflight import needs_weights

    if payload.get("backbone_state") == "full":
        return
    model = effective.get("model", {})
    weights = model.get("pfm_weights_path")
    if weights is not None and not Path(weights).exists():
        raise WsisegError(
            f"the PFM weights {weights} this checkpoint was trained on are not there: pass your copy with --weights"
        )
    if weights is None and needs_weights(model["name"]) and not random_weights:
        raise WsisegError(
            f"this checkpoint keeps only its decoder{' and adapter' if payload.get('backbone_state') == 'adapter' else ''}"
            ": "
            f"its {model['name']} backbone is rebuilt from the PFM weights; pass them with --weights "
            "(or --random-weights for an untrained backbone, for tests only)"
        )


def load_predictor(
    checkpoint: str | Path, config: dict[str, Any] | str | Path | None = None, device: Any = "cpu",
    precision: str | None = None, weights: str | Path | None = None, random_weights: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """(SegmenterPredictor, effective config) of a checkpoint, checking the config against it.

    `weights` replaces the config's `model.pfm_weights_path` (where the backbone is rebuilt from).
    """
    import copy

    from wsiseg.engine.predictors import SegmenterPredictor
    from wsiseg.models.checkpoint import load_segmenter, read_checkpoint

    payload = read_checkpoint(checkpoint)
    stored = payload["config"]
    user = _load_config(config)
    effective = copy.deepcopy(stored if user is None else user)
    if weights is not None:
        effective.setdefault("model", {})["pfm_weights_path"] = str(weights)
    effective["model"].setdefault("name", stored["model"]["name"])
    check_backbone_weights(payload, effective, random_weights)
    given = effective if user is not None or weights is not None else None
    model = load_segmenter(given, payload, device=str(device))
    precision = precision or effective.get("system", {}).get("precision", "auto")
    predictor = SegmenterPredictor(model, model.class_names, precision=precision)
    predictor.config = effective
    return predictor, effective


def segment_slide(
    slide: str | Path | Any,
    checkpoint: str | Path,
    out: str | Path,
    config: dict[str, Any] | str | Path | None = None,
    mode: str = "windowslide",
    mpp: float | None = None,
    slide_mpp: float | None = None,
    window: int | None = None,
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 16,
    device: str = "auto",
    workers: int | str = "auto",
    overwrite: bool = False,
    save_probabilities: bool = False,
    background: int | str | None = None,
    exports: Sequence[str] = DEFAULT_EXPORTS,
    precision: str | None = None,
    show_progress: bool = True,
    predictor: Any = None,
    clip_to_tissue: bool = True,
    tissue: str | Path = "auto",
    weights: str | Path | None = None,
    random_weights: bool = False,
) -> dict[str, Any]:
    """Segment one slide (file or tile store) with a trained checkpoint into folder `out`; returns the summary.

    MPP and window default to the config's `dataset.mpp` and `model.input_size` (the training
    config stored in the checkpoint unless `config` is given). `predictor` reuses a model
    already loaded by `load_predictor` (whose `.config` then gives those defaults). `tissue`:
    auto (detect), all (the whole image) or a PNG/GeoJSON mask file. `weights`: the PFM weights the
    backbone is rebuilt from, when the checkpoint does not store it (`random_weights`: allow none).
    """
    if predictor is None:
        preflight([slide], checkpoint, [Path(out)], config=config, mode=mode, mpp=mpp, slide_mpp=slide_mpp,
                  window=window, overlap=overlap, blend=blend, batch_size=batch_size, workers=workers,
                  exports=exports, overwrite=overwrite, tissue=tissue, weights=weights)
    torch_device = resolve_device(device)
    if predictor is None:
        predictor, effective = load_predictor(checkpoint, config, torch_device, precision, weights, random_weights)
    else:
        effective = getattr(predictor, "config", None) or _load_config(config) or {}
    from wsiseg.config import defaults

    mpp = float(mpp if mpp is not None else effective.get("dataset", {}).get("mpp", defaults("dataset")["mpp"]))
    window = int(window if window is not None else effective.get("model", {}).get("input_size",
                                                                                defaults("model")["input_size"]))
    checkpoint = Path(checkpoint)
    stat = checkpoint.stat()
    model_info = {
        "checkpoint": str(checkpoint.resolve()), "checkpoint_size": stat.st_size, "checkpoint_mtime": stat.st_mtime,
        "name": effective.get("model", {}).get("name"),
    }
    return run_slide(
        slide, predictor, out, mpp=mpp, window=window, overlap=overlap, blend=blend, batch_size=batch_size,
        device=str(torch_device), workers=workers, mode=mode,
        background=background_label(predictor.class_names, background), slide_mpp=slide_mpp,
        overwrite=overwrite, save_probabilities=save_probabilities, exports=exports, model_info=model_info,
        show_progress=show_progress, clip_to_tissue=clip_to_tissue, tissue=tissue,
    )


def preflight(
    slides: Sequence[str | Path], checkpoint: str | Path, folders: Sequence[Path], skip_errors: bool = False,
    config: Any = None, exports: Sequence[str] = DEFAULT_EXPORTS, overwrite: bool = False, **options: Any,
) -> dict[str, str]:
    """Check files, slides, outputs and options before torch or the model is loaded.

    Returns {slide: error} of the slides that cannot run (only with `skip_errors`; otherwise the
    first error is raised).
    """
    from wsiseg.engine.preflight import check_file, check_outputs, check_run_options, check_source

    check_file(checkpoint, "checkpoint", "pass the .pth file `wsiseg train` wrote")
    if not Path(checkpoint).is_file():
        raise WsisegError(f"checkpoint {checkpoint} is a folder: pass the .pth file `wsiseg train` wrote")
    if not isinstance(config, dict):
        check_file(config, "config file", "pass the training YAML, or leave --config out")
    check_file(options.get("weights"), "weights file", "pass the PFM weights the checkpoint was trained on to --weights")
    check_run_options(**{key: options[key] for key in _RUN_OPTIONS if options.get(key) is not None})
    if not slides:
        raise WsisegError("no slides given: pass one or more slide files or tile stores")
    failed = {}
    for slide, folder in zip(slides, folders):
        try:
            check_source(slide, options.get("slide_mpp"))
            check_outputs([folder], exports, overwrite)
        except WsisegError as error:
            if not skip_errors:
                raise
            failed[str(slide)] = str(error)
    return failed


_RUN_OPTIONS = ("mode", "blend", "overlap", "batch_size", "workers", "mpp", "slide_mpp", "window", "tissue")


_PREDICTOR: dict[str, Any] = {}  # the last predictor loaded in this process (a dask worker keeps its model)


def cached_predictor(
    checkpoint: str | Path, config: Any, device: Any, precision: str | None, weights: str | Path | None = None,
    random_weights: bool = False,
) -> Any:
    """`load_predictor`, reusing the model this process loaded last when the same one is asked for again."""
    checkpoint = Path(checkpoint)
    stamp = checkpoint.stat().st_mtime_ns if checkpoint.is_file() else None  # missing: load_predictor says so
    key = json.dumps([str(checkpoint.resolve()), stamp, config, str(device), precision, weights, random_weights],
                     default=str)
    if key not in _PREDICTOR:
        _PREDICTOR.clear()
        _PREDICTOR[key] = load_predictor(checkpoint, config, device, precision, weights, random_weights)[0]
    return _PREDICTOR[key]


def _segment_one(slide: Path, out: Path, checkpoint: str, options: dict[str, Any]) -> SlideResult:
    """One slide, here or as a dask task (the model is loaded once per process)."""
    device = resolve_device(options.get("device", "auto"))
    predictor = cached_predictor(checkpoint, options.get("config"), device, options.get("precision"),
                                 options.get("weights"), options.get("random_weights", False))
    summary = segment_slide(slide, checkpoint, out, predictor=predictor, **options)
    return SlideResult.from_summary(slide, out, summary)


def segment_slides(
    slides: Sequence[str | Path],
    checkpoint: str | Path,
    out: str | Path,
    skip_errors: bool = False,
    scheduler: str | None = None,
    **options: Any,
) -> list[SlideResult]:
    """Segment several slides, each into its folder (`slide_outputs`); one SlideResult per slide.

    Slides finished by an earlier run with the same settings are skipped, interrupted ones
    resume. Without `skip_errors` the first user error stops the run. With `scheduler` (a
    dask.distributed address) each slide is one task, asking for one `GPU` resource when the
    device is explicitly `cuda*`. The output folder is locked for the run.
    """
    if not slides:
        raise WsisegError("no slides given: pass one or more slide files or tile stores")
    paths = [Path(s) for s in slides]
    outputs = slide_outputs(paths, out)
    if scheduler:  # paths are the workers' to open: only the options are checked here
        from wsiseg.engine.preflight import check_run_options

        check_run_options(**{key: options[key] for key in _RUN_OPTIONS if options.get(key) is not None})
        failed: dict[str, str] = {}
    else:
        failed = preflight(paths, checkpoint, outputs, skip_errors, **options)
    on_gpu = str(options.get("device") or "auto").startswith("cuda")
    options = {**options, "show_progress": options.get("show_progress", True) and not scheduler}
    task = partial(_segment_one, checkpoint=str(checkpoint), options=options)
    ready = [(path, output) for path, output in zip(paths, outputs) if str(path) not in failed]
    with output_lock(out, "segment"), dask_client(scheduler if ready else None) as client:
        if client is not None and on_gpu:
            require_gpu_workers(client, scheduler)
        done = run_slides([p for p, _ in ready], [o for _, o in ready], task, skip_errors=skip_errors, client=client,
                          resources={"GPU": 1} if on_gpu else None)
    results = dict(zip([p for p, _ in ready], done))
    for path, output in zip(paths, outputs):
        if str(path) in failed:
            log.error("%s: %s (skipped)", path.name, failed[str(path)])
            results[path] = SlideResult(path, output, "failed", message=failed[str(path)])
    return [results[path] for path in paths]
