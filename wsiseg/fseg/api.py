"""The F-Seg API: fit concept banks on slides, and segment slides by projection onto a bank."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsiseg.errors import WsisegError
from wsiseg.fseg.concepts import ConceptBank, load_bank, save_bank
from wsiseg.fseg.features import DEFAULT_LAYER, DEFAULT_MODEL, FeatureExtractor, load_extractor
from wsiseg.fseg.modes import MODES
from wsiseg.progress import get_logger

log = get_logger("fseg")

DEFAULT_KS = (8, 16, 32, 64)
DEFAULT_MPP = 0.5
DEFAULT_WINDOW = 512
BANK_NAME = "concepts.safetensors"


def _paths(slides: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(slides, (str, Path)):
        return [Path(slides)]
    paths = [Path(s) for s in slides]
    if not paths:
        raise WsisegError("no slide given: pass at least one slide path")
    return paths


def _open(paths: list[Path], mpp: float, slide_mpp: float | None, tissue: str | Path = "auto") -> list[Any]:
    """Engine source views (slide files or `wsiseg tile` stores) at `mpp`, with the --tissue option."""
    from wsiseg.engine.source import open_source

    views: list[Any] = []
    try:
        for path in paths:
            views.append(open_source(path, mpp, slide_mpp, tissue))
    except BaseException:
        _close(views)
        raise
    return views


def _close(views: list[Any]) -> None:
    """Release the file handles of the source views `_open` returned."""
    for view in views:
        view.reader.close()


def _check_window(extractor: FeatureExtractor, window: int) -> None:
    multiple = extractor.input_multiple
    if window < multiple or window % multiple:
        low = max(multiple, window // multiple * multiple)
        raise WsisegError(
            f"--window {window} is not a multiple of {multiple} (the patch size / stride of {extractor.model}): "
            f"use {low} or {low + multiple}"
        )


def _fit(
    views: list[Any],
    extractor: FeatureExtractor,
    ks: Sequence[int],
    mpp: float,
    window: int,
    max_windows: int,
    max_tokens: int,
    seed: int,
) -> ConceptBank:
    import torch

    from wsiseg.fseg.kmeans import multi_kmeans
    from wsiseg.fseg.sampling import sample_tokens

    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise WsisegError(f"--k values must be positive integers, got {ks}")
    tokens = sample_tokens(views, extractor, mpp, window, max_windows, max_tokens, seed=seed)
    distinct = int(torch.unique(tokens, dim=0).shape[0])
    if distinct < ks[-1]:
        raise WsisegError(
            f"k={ks[-1]} is larger than the {distinct} distinct token features sampled: use a smaller --k, "
            "more or larger slides, or a finer --mpp"
        )
    log.info("fitting k = %s on %d tokens of %d features", ", ".join(map(str, ks)), tokens.shape[0], tokens.shape[1])
    centres = multi_kmeans(tokens, ks, seed=seed)
    return ConceptBank(
        {k: c.cpu().numpy() for k, c in centres.items()},
        model=extractor.model,
        layer=str(extractor.layer),
        mpp=mpp,
        window=window,
        extra={"slides": [Path(v.path).name for v in views], "tokens": int(tokens.shape[0])},
    )


def fit_concepts(
    slides: str | Path | Sequence[str | Path],
    out: str | Path | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    model: str = DEFAULT_MODEL,
    weights: str | Path | None = None,
    layer: int = DEFAULT_LAYER,
    mpp: float = DEFAULT_MPP,
    slide_mpp: float | None = None,
    window: int = DEFAULT_WINDOW,
    max_windows: int = 64,
    max_tokens: int = 50_000,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    tissue: str | Path = "auto",
    random_weights: bool = False,
) -> ConceptBank:
    """Fit a concept bank (k-means centres of token features, every k in one pass) on the tissue of slides.

    The bank is written to `out` (safetensors) when given, and returned. A registry PFM needs
    `weights` (`random_weights` allows an untrained one, for tests).
    """
    from wsiseg.engine.preflight import check_positive, check_weights
    from wsiseg.outputs import check_writable
    from wsiseg.slide.mask import check_tissue_option

    paths = _paths(slides)
    check_tissue_option(tissue)
    check_positive("--mpp", mpp)
    check_weights(model, weights, random_weights)
    if out is not None:
        check_writable(Path(out), overwrite)
    opened = _open(paths, mpp, slide_mpp, tissue)
    try:
        extractor = load_extractor(model, weights, layer, device)
        _check_window(extractor, window)
        bank = _fit(opened, extractor, ks, mpp, window, max_windows, max_tokens, seed)
        if out is not None:
            save_bank(bank, Path(out), overwrite=overwrite)
            log.info("concept bank written to %s", out)
        return bank
    finally:
        _close(opened)


def fseg_slide(
    slides: str | Path | Sequence[str | Path],
    out: str | Path,
    k: int = 8,
    model: str | None = None,
    weights: str | Path | None = None,
    bank: str | Path | ConceptBank | None = None,
    mode: str = "project",
    scale_before_argmax: bool = False,
    layer: int | None = None,
    mpp: float | None = None,
    slide_mpp: float | None = None,
    window: int | None = None,
    overlap: float = 0.25,
    batch_size: int = 8,
    device: str = "auto",
    fit_windows: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    tissue: str | Path = "auto",
    random_weights: bool = False,
    **engine_options: Any,
) -> list[dict[str, Any]]:
    """Segment slides into k concepts: project token features on a bank, blend, argmax, write outputs.

    Without `bank`, k concepts are first fitted on the tissue of the given slides (together, so
    labels agree across them) and saved as `out`/concepts.safetensors. Model, layer, MPP and
    window default to the bank's when it records them. One output folder per slide under `out`
    when several slides are given, else `out` itself. `tissue`: auto (detect), all (the whole
    image) or a PNG/GeoJSON mask file. A registry PFM needs `weights` (`random_weights` allows an
    untrained one, for tests). Everything a user can get wrong is checked before the model loads.
    Returns the engine's summaries.
    """
    from wsiseg.engine.preflight import check_outputs, check_run_options, check_source, check_weights
    from wsiseg.engine.run import DEFAULT_EXPORTS, run_slide
    from wsiseg.fseg.predictor import FsegPredictor

    if mode not in MODES:
        raise WsisegError(f"unknown --mode {mode!r}: use one of {', '.join(MODES)}")
    if k < 1:
        raise WsisegError(f"--k must be a positive integer, got {k}")
    paths = _paths(slides)
    out = Path(out)
    loaded = load_bank(Path(bank)) if isinstance(bank, (str, Path)) else bank
    concepts = None
    if loaded is not None:
        model = model or loaded.model
        layer = layer if layer is not None else (int(loaded.layer) if loaded.layer is not None else None)
        mpp = mpp or loaded.mpp
        window = window or loaded.window
        concepts = loaded.projection_concepts(k)  # k not in the bank, NaN: refuse before any heavy work
        if loaded.model is not None and model != loaded.model:
            loaded.check_compatible(model, loaded.feature_dim)
    model = model or DEFAULT_MODEL
    layer = DEFAULT_LAYER if layer is None else layer
    mpp = mpp or DEFAULT_MPP
    window = window or DEFAULT_WINDOW
    engine_checked = {key: engine_options[key] for key in ("blend", "workers") if key in engine_options}
    check_run_options(overlap=overlap, batch_size=batch_size, mpp=mpp, slide_mpp=slide_mpp, window=window,
                      tissue=tissue, **engine_checked)
    check_weights(model, weights, random_weights)
    for path in paths:
        check_source(path, slide_mpp)
    targets = [out] if len(paths) == 1 else [out / p.stem for p in paths]
    if len({t.name for t in targets}) != len(targets):
        raise WsisegError("several slides share a file name: run them into separate --out folders")
    check_outputs(targets, engine_options.get("exports", DEFAULT_EXPORTS), overwrite)
    opened = _open(paths, mpp, slide_mpp, tissue)
    try:
        from wsiseg.fseg.sampling import tissue_windows

        for view in opened:
            if not tissue_windows(view, window, mpp):
                raise WsisegError(f"no tissue found in {view.path}: check the slide, or pass --tissue all or a mask file")
        extractor = load_extractor(model, weights, layer, device)
        _check_window(extractor, window)
        if loaded is None:
            loaded = _fit(opened, extractor, [k], mpp, window, fit_windows, 50_000, seed)
            bank_path = out / BANK_NAME
            out.mkdir(parents=True, exist_ok=True)
            save_bank(loaded, bank_path, overwrite=True)
            log.info("fitted k=%d concepts on the slide(s): saved as %s (reuse it with --bank)", k, bank_path)
            concepts = loaded.projection_concepts(k)
        else:
            loaded.check_compatible(model, extractor.feature_dim, str(extractor.layer))
            bank_path = Path(bank) if isinstance(bank, (str, Path)) else None
        predictor = FsegPredictor(extractor, concepts, mode=mode, scale_before_argmax=scale_before_argmax)
        info = {
            "name": model, "layer": extractor.layer, "feature_dim": extractor.feature_dim, "fseg": True, "k": k,
            "mode": mode, "scale_before_argmax": scale_before_argmax,
            "bank": str(bank_path) if bank_path else None,
            "bank_sha256": hashlib.sha256(concepts.tobytes()).hexdigest()[:16],
        }
        summaries = []
        for view, target in zip(opened, targets):
            summaries.append(run_slide(
                view, predictor, target, mpp=mpp, window=window, overlap=overlap, batch_size=batch_size,
                device=str(extractor.device), overwrite=overwrite, model_info=info, tissue=tissue, **engine_options,
            ))
        return summaries
    finally:
        _close(opened)
