"""Token features sampled from the tissue of one or many slides (the material concept banks are fitted on)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsiseg.errors import WsisegError
from wsiseg.fseg.features import FeatureExtractor
from wsiseg.progress import get_logger, progress_bar

if TYPE_CHECKING:
    import torch

log = get_logger("fseg")


def tissue_windows(view: Any, window: int, mpp: float) -> list[tuple[int, int]]:
    """Top-left corners of the non-overlapping windows of a source view (engine SourceView) that hold tissue."""
    from wsiseg.slide.grid import Grid

    grid = Grid.from_overlap(view.width, view.height, window, 0.0)
    return grid.tissue_positions(view.tissue(), mpp)


def sample_tokens(
    views: Sequence[Any],
    extractor: FeatureExtractor,
    mpp: float,
    window: int,
    max_windows: int = 64,
    max_tokens: int = 50_000,
    batch_size: int = 4,
    seed: int = 0,
) -> "torch.Tensor":
    """ReLU'd token features (N, D) on the extractor's device from up to `max_windows` tissue windows.

    `views` are the engine's source views (slides or tile stores at `mpp`). Windows are drawn at
    random (seeded) from the tissue windows of all sources together; at
    most `max_tokens` tokens are kept, drawn at random, so memory stays bounded.
    """
    import torch

    if max_windows < 1 or max_tokens < 1:
        raise WsisegError(
            f"--max-windows and --max-tokens must be at least 1 (got {max_windows} and {max_tokens}): "
            "concepts are fitted on sampled tissue windows and their token features"
        )
    candidates: list[tuple[int, int, int]] = []
    for index, view in enumerate(views):
        positions = tissue_windows(view, window, mpp)
        if not positions:
            log.warning("no tissue found in %s: it contributes no tokens", Path(view.path).name)
        candidates += [(index, x, y) for x, y in positions]
    if not candidates:
        names = ", ".join(Path(v.path).name for v in views)
        raise WsisegError(f"no tissue found in {names}: check the slide(s), or pass a bank fitted elsewhere with --bank")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(candidates, min(max_windows, len(candidates))))
    per_window = max(1, -(-max_tokens // len(chosen)))
    generator = torch.Generator().manual_seed(seed)
    kept: list[torch.Tensor] = []
    with progress_bar(len(chosen), "sampling concept tokens", unit="windows") as advance:
        for start in range(0, len(chosen), batch_size):
            part = chosen[start : start + batch_size]
            pixels = np.stack([views[i].reader.read(x, y, window, window, mpp) for i, x, y in part])
            batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
            features = extractor(batch)
            for f in features:
                tokens = f.reshape(f.shape[0], -1).T
                if tokens.shape[0] > per_window:
                    pick = torch.randperm(tokens.shape[0], generator=generator)[:per_window]
                    tokens = tokens[pick.to(tokens.device)]
                kept.append(tokens)
            advance(len(part))
    tokens = torch.cat(kept)
    if tokens.shape[0] > max_tokens:
        tokens = tokens[torch.randperm(tokens.shape[0], generator=generator)[:max_tokens].to(tokens.device)]
    return tokens
