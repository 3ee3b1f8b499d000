"""The F-Seg API: fit concept banks on slides, and segment slides by projection onto a bank."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsiseg.engine.settings import RunSettings
from wsiseg.errors import WsisegError
from wsiseg.fseg.concepts import ConceptBank, load_bank, save_bank
from wsiseg.fseg.features import FeatureExtractor, load_extractor
from wsiseg.fseg.options import BANK_NAME, DEFAULT_KS, FsegOptions, fseg_request, with_defaults
from wsiseg.progress import get_logger

log = get_logger("fseg")


def _paths(slides: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(slides, (str, Path)):
        return [Path(slides)]
    paths = [Path(s) for s in slides]
    if not paths:
        raise WsisegError("no slide given: pass at least one slide path")
    return paths


def _open(paths: list[Path], settings: RunSettings) -> list[Any]:
    """Engine source views (slide files or `wsiseg tile` stores) at the settings' MPP, with their --tissue."""
    from wsiseg.engine.source import open_source

    views: list[Any] = []
    try:
        for path in paths:
            views.append(open_source(path, settings.mpp, settings.slide_mpp, settings.tissue))
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
    settings: RunSettings,
    max_windows: int,
    max_tokens: int,
    seed: int,
) -> ConceptBank:
    import torch

    from wsiseg.fseg.kmeans import multi_kmeans
    from wsiseg.fseg.sampling import sample_tokens

    mpp, window = settings.mpp, settings.window
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
    max_windows: int = 64,
    max_tokens: int = 50_000,
    settings: RunSettings | None = None,
    fseg: FsegOptions | None = None,
    **options: Any,
) -> ConceptBank:
    """Fit a concept bank (k-means centres of token features, every k in one pass) on the tissue of slides.

    `options` are fields of `RunSettings` (mpp, slide_mpp, window, device, tissue, overwrite) and of
    `FsegOptions` (model, weights, layer, seed, random_weights). The bank is written to `out`
    (safetensors) when given, and returned. A registry PFM needs `weights` (`random_weights`
    allows an untrained one, for tests).
    """
    from wsiseg.engine.preflight import check_weights
    from wsiseg.outputs import check_writable

    settings, fseg = with_defaults(*fseg_request(settings, fseg, options))
    paths = _paths(slides)
    check_weights(fseg.model, fseg.weights, fseg.random_weights)
    if out is not None:
        check_writable(Path(out), settings.overwrite)
    opened = _open(paths, settings)
    try:
        extractor = _load_extractor(settings, fseg)
        bank = _fit(opened, extractor, ks, settings, max_windows, max_tokens, fseg.seed)
        if out is not None:
            save_bank(bank, Path(out), overwrite=settings.overwrite)
            log.info("concept bank written to %s", out)
        return bank
    finally:
        _close(opened)


def _with_bank(
    settings: RunSettings, fseg: FsegOptions, bank: ConceptBank | None
) -> tuple[RunSettings, FsegOptions]:
    """Backbone, layer, MPP and window the call leaves open taken from the bank, else the defaults."""
    if bank is not None:
        layer = fseg.layer if fseg.layer is not None else (int(bank.layer) if bank.layer is not None else None)
        fseg = fseg.replace(model=fseg.model or bank.model, layer=layer)
        settings = settings.replace(mpp=settings.mpp or bank.mpp, window=settings.window or bank.window)
        bank.finite_concepts(fseg.k)  # k not in the bank, NaN: refuse before any heavy work (no warning yet)
        if bank.model is not None and fseg.model != bank.model:
            bank.check_compatible(fseg.model, bank.feature_dim)
    return with_defaults(settings, fseg)


def _targets(paths: list[Path], out: Path, settings: RunSettings, fseg: FsegOptions) -> list[Path]:
    """The output folder of each slide, once weights, slides and folders are checked."""
    from wsiseg.engine.preflight import check_outputs, check_source, check_weights

    check_weights(fseg.model, fseg.weights, fseg.random_weights)
    for path in paths:
        check_source(path, settings.slide_mpp)
    targets = [out] if len(paths) == 1 else [out / p.stem for p in paths]
    if len({t.name for t in targets}) != len(targets):
        raise WsisegError("several slides share a file name: run them into separate --out folders")
    check_outputs(targets)
    return targets


def _load_extractor(settings: RunSettings, fseg: FsegOptions) -> FeatureExtractor:
    """The backbone's feature extractor, checked against the window."""
    extractor = load_extractor(fseg.model, fseg.weights, fseg.layer, settings.device)
    _check_window(extractor, settings.window)
    return extractor


def _extractor(views: list[Any], settings: RunSettings, fseg: FsegOptions) -> FeatureExtractor:
    """The backbone's feature extractor, once every slide is known to hold a tissue window."""
    from wsiseg.fseg.sampling import tissue_windows

    for view in views:
        if not tissue_windows(view, settings.window, settings.mpp):
            raise WsisegError(f"no tissue found in {view.path}: check the slide, or pass --tissue all or a mask file")
    return _load_extractor(settings, fseg)


def _concepts(
    views: list[Any], extractor: FeatureExtractor, out: Path, settings: RunSettings, fseg: FsegOptions,
    bank: ConceptBank | None,
) -> tuple[Any, Path | None]:
    """(k concepts, bank file): of the bank given, or fitted on the slides and saved in `out`."""
    if bank is not None:
        bank.check_compatible(fseg.model, extractor.feature_dim, str(extractor.layer))
        return bank.projection_concepts(fseg.k), Path(fseg.bank) if isinstance(fseg.bank, (str, Path)) else None
    bank = _fit(views, extractor, [fseg.k], settings, fseg.fit_windows, 50_000, fseg.seed)
    bank_path = out / BANK_NAME
    out.mkdir(parents=True, exist_ok=True)
    save_bank(bank, bank_path, overwrite=True)
    log.info("fitted k=%d concepts on the slide(s): saved as %s (reuse it with --bank)", fseg.k, bank_path)
    return bank.projection_concepts(fseg.k), bank_path


def fseg_slide(
    slides: str | Path | Sequence[str | Path],
    out: str | Path,
    settings: RunSettings | None = None,
    fseg: FsegOptions | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Segment slides into k concepts: project token features on a bank, blend, argmax, write outputs.

    `options` are fields of `FsegOptions` (k, bank, model, weights, layer, mode, ...) and of
    `RunSettings` (mpp, window, overlap, batch_size, device, tissue, exports, ...). Without a
    bank, k concepts are first fitted on the tissue of the given slides (together, so labels
    agree across them) and saved as `out`/concepts.safetensors. Model, layer, MPP and window
    default to the bank's when it records them. One output folder per slide under `out` when
    several slides are given, else `out` itself. A registry PFM needs `weights` (`random_weights`
    allows an untrained one, for tests). Everything a user can get wrong is checked before the
    model loads. Returns the engine's summaries.
    """
    from wsiseg.engine.run import run_slide
    from wsiseg.fseg.predictor import FsegPredictor

    settings, fseg = fseg_request(settings, fseg, options)
    paths = _paths(slides)
    out = Path(out)
    bank = load_bank(Path(fseg.bank)) if isinstance(fseg.bank, (str, Path)) else fseg.bank
    settings, fseg = _with_bank(settings, fseg, bank)
    targets = _targets(paths, out, settings, fseg)
    opened = _open(paths, settings)
    try:
        extractor = _extractor(opened, settings, fseg)
        concepts, bank_path = _concepts(opened, extractor, out, settings, fseg, bank)
        predictor = FsegPredictor(extractor, concepts, mode=fseg.mode, scale_before_argmax=fseg.scale_before_argmax)
        info = {
            "name": fseg.model, "layer": extractor.layer, "feature_dim": extractor.feature_dim, "fseg": True,
            "k": fseg.k, "mode": fseg.mode, "scale_before_argmax": fseg.scale_before_argmax,
            "bank": str(bank_path) if bank_path else None,
            "bank_sha256": hashlib.sha256(concepts.tobytes()).hexdigest()[:16],
        }
        return [run_slide(view, predictor, target, settings, model_info=info, torch_device=extractor.device)
                for view, target in zip(opened, targets)]
    finally:
        _close(opened)
