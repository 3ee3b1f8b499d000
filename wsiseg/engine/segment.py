"""`wsiseg.segment_slide` / `wsiseg segment`: a trained segmenter over whole slides.

The checkpoint (and optionally the training config) gives the model, the classes, the
segmentation MPP (`dataset.mpp`) and the window (`model.input_size`); everything after that is
`run_slide`. Several slides run one after another, or one task per slide on a dask.distributed
cluster (`scheduler`), each slide into its own folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from wsiseg.devices import resolve_device
from wsiseg.driver import SlideResult, dask_client, require_gpu_workers, run_slides, slide_outputs
from wsiseg.engine.run import run_slide
from wsiseg.engine.settings import RunSettings, split_options
from wsiseg.errors import WsisegError
from wsiseg.locks import output_lock
from wsiseg.model_cache import file_stamp, last_loaded
from wsiseg.progress import get_logger

log = get_logger("segment")


def _load_config(config: dict[str, Any] | str | Path | None) -> dict[str, Any] | None:
    """The validated training config, or None."""
    if config is None or isinstance(config, dict):
        return config
    from wsiseg.config import load_config

    return load_config(config, splits=(), check_files=False)


def check_backbone_weights(payload: dict[str, Any], effective: dict[str, Any], random_weights: bool = False,
                           fix: str = "pass your copy with --weights") -> None:
    """Refuse a checkpoint whose backbone must be rebuilt from PFM weights that are not given (or not there).

    A checkpoint that stores its whole backbone needs none; one that stores only an adapter (or
    nothing, for a frozen backbone) is rebuilt from `model.pfm_weights_path`, or `--weights`.
    `fix` says how the command takes the weights' new place.
    """
    from wsiseg.engine.preflight import needs_weights

    if payload.get("backbone_state") == "full":
        return
    model = effective.get("model", {})
    weights = model.get("pfm_weights_path")
    if weights is not None and not Path(weights).exists():
        raise WsisegError(
            f"the PFM weights {weights} this checkpoint was trained on are not there: {fix}"
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


@dataclass(frozen=True)
class SegmentModel:
    """Where segment's model comes from: the checkpoint, the training config (None: the one stored
    in it), the PFM weights its backbone is rebuilt from (`random_weights`: allow none) and the precision."""

    checkpoint: Path
    config: dict[str, Any] | str | Path | None = None
    weights: str | Path | None = None
    random_weights: bool = False
    precision: str | None = None

    def load(self, device: Any) -> Any:
        """`load_predictor` of this model on `device`."""
        return load_predictor(self.checkpoint, self.config, device, self.precision, self.weights,
                              self.random_weights)[0]

    def info(self, effective: dict[str, Any]) -> dict[str, Any]:
        """The model part of a run's fingerprint: the checkpoint file and the backbone name."""
        checkpoint = Path(self.checkpoint)
        stat = checkpoint.stat()
        return {
            "checkpoint": str(checkpoint.resolve()), "checkpoint_size": stat.st_size,
            "checkpoint_mtime": stat.st_mtime, "name": effective.get("model", {}).get("name"),
        }


def segment_request(
    checkpoint: str | Path, settings: RunSettings | None, options: dict[str, Any]
) -> tuple[RunSettings, SegmentModel]:
    """The run settings and model of a call: `options` override fields of either by name."""
    run_fields, model_fields = split_options(options, RunSettings, SegmentModel)
    return RunSettings.build(settings, **run_fields), SegmentModel(Path(checkpoint), **model_fields)


def segment_slide(
    slide: str | Path | Any,
    checkpoint: str | Path,
    out: str | Path,
    settings: RunSettings | None = None,
    predictor: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Segment one slide (file or tile store) with a trained checkpoint into folder `out`; returns the summary.

    `options` are fields of `RunSettings` (mpp, window, overlap, batch_size, device, tissue, exports,
    ...) and of `SegmentModel` (config, weights, random_weights, precision), overriding `settings`.
    MPP and window default to the config's `dataset.mpp` and `model.input_size` (the training
    config stored in the checkpoint unless `config` is given). `predictor` reuses a model
    already loaded by `load_predictor` (whose `.config` then gives those defaults).
    """
    settings, model = segment_request(checkpoint, settings, options)
    if predictor is None:
        preflight([slide], model, [Path(out)], settings)
    device = resolve_device(settings.device)
    if predictor is None:
        predictor = model.load(device)
    return _segment(slide, out, model, settings, predictor, device)


def _segment(slide: Any, out: str | Path, model: SegmentModel, settings: RunSettings, predictor: Any,
             device: Any) -> dict[str, Any]:
    """`run_slide` with the MPP and window of the predictor's config where the settings leave them out."""
    from wsiseg.config import defaults

    effective = getattr(predictor, "config", None) or _load_config(model.config) or {}
    mpp = settings.mpp if settings.mpp is not None else effective.get("dataset", {}).get("mpp",
                                                                                         defaults("dataset")["mpp"])
    window = settings.window if settings.window is not None else effective.get("model", {}).get(
        "input_size", defaults("model")["input_size"])
    settings = settings.replace(mpp=float(mpp), window=int(window))
    return run_slide(slide, predictor, out, settings, model_info=model.info(effective), torch_device=device)


def preflight(
    slides: Sequence[str | Path], model: SegmentModel, folders: Sequence[Path], settings: RunSettings,
    skip_errors: bool = False,
) -> dict[str, str]:
    """Check files, slides and outputs before torch or the model is loaded (`settings` are checked already).

    Returns {slide: error} of the slides that cannot run (only with `skip_errors`; otherwise the
    first error is raised).
    """
    from wsiseg.engine.preflight import check_file, check_outputs, check_source

    check_file(model.checkpoint, "checkpoint", "pass the .pth file `wsiseg train` wrote")
    if not Path(model.checkpoint).is_file():
        raise WsisegError(f"checkpoint {model.checkpoint} is a folder: pass the .pth file `wsiseg train` wrote")
    if not isinstance(model.config, dict):
        check_file(model.config, "config file", "pass the training YAML, or leave --config out")
    check_file(model.weights, "weights file", "pass the PFM weights the checkpoint was trained on to --weights")
    if not slides:
        raise WsisegError("no slides given: pass one or more slide files or tile stores")
    failed = {}
    for slide, folder in zip(slides, folders):
        try:
            check_source(slide, settings.slide_mpp, settings.mpp)
            check_outputs([folder])
        except WsisegError as error:
            if not skip_errors:
                raise
            failed[str(slide)] = str(error)
    return failed


def cached_predictor(model: SegmentModel, device: Any) -> Any:
    """`model.load(device)`, reusing the model this process loaded last when the same one is asked for again."""
    key = ["segment", file_stamp(model.checkpoint), model.config, str(device), model.precision,
           file_stamp(model.weights), model.random_weights]
    return last_loaded(key, lambda: model.load(device))


def _segment_one(slide: Path, out: Path, model: SegmentModel, settings: RunSettings) -> SlideResult:
    """One slide, here or as a dask task (the model is loaded once per process)."""
    device = resolve_device(settings.device)
    summary = _segment(slide, out, model, settings, cached_predictor(model, device), device)
    return SlideResult.from_summary(slide, out, summary)


def segment_slides(
    slides: Sequence[str | Path],
    checkpoint: str | Path,
    out: str | Path,
    settings: RunSettings | None = None,
    skip_errors: bool = False,
    scheduler: str | None = None,
    **options: Any,
) -> list[SlideResult]:
    """Segment several slides, each into its folder (`slide_outputs`); one SlideResult per slide.

    `settings` and `options` as in `segment_slide`. Slides finished by an earlier run with the
    same settings are skipped, interrupted ones resume. Without `skip_errors` the first user
    error stops the run. With `scheduler` (a dask.distributed address) each slide is one task,
    asking for one `GPU` resource when the device is explicitly `cuda*`. The output folder is
    locked for the run.
    """
    settings, model = segment_request(checkpoint, settings, options)
    if not slides:
        raise WsisegError("no slides given: pass one or more slide files or tile stores")
    paths = [Path(s) for s in slides]
    outputs = slide_outputs(paths, out)
    # with a scheduler, paths are the workers' to open: only the settings are checked here
    failed = {} if scheduler else preflight(paths, model, outputs, settings, skip_errors)
    on_gpu = settings.device.startswith("cuda")
    settings = settings.replace(show_progress=settings.show_progress and not scheduler)
    task = partial(_segment_one, model=model, settings=settings)
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
