"""K-means for several k at once on non-negative token features, chunked and on the tokens' device.

Centres of non-negative features are means of non-negative vectors, so they are non-negative
by construction (the "non-negative k-means" of F-Seg). Every Lloyd iteration makes one pass over
the tokens in chunks and scores each chunk against the centres of all k values in one matrix
product, so memory stays bounded by the chunk size and the number of centres.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CHUNK_TOKENS = 8192
INIT_SAMPLE = 20000


def _plus_plus(tokens: "torch.Tensor", k: int, generator: "torch.Generator") -> "torch.Tensor":
    """k-means++ seeding (greedy, on at most INIT_SAMPLE tokens)."""
    import torch

    if tokens.shape[0] > INIT_SAMPLE:
        pick = torch.randperm(tokens.shape[0], generator=generator)[:INIT_SAMPLE].to(tokens.device)
        tokens = tokens[pick]
    n = tokens.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [tokens[first]]
    nearest = ((tokens - tokens[first]) ** 2).sum(dim=1)
    for _ in range(1, k):
        total = nearest.sum()
        if float(total) <= 0:
            index = int(torch.randint(n, (1,), generator=generator))
        else:
            probabilities = (nearest / total).double().cpu()
            index = int(torch.multinomial(probabilities, 1, generator=generator))
        centres.append(tokens[index])
        nearest = torch.minimum(nearest, ((tokens - tokens[index]) ** 2).sum(dim=1))
    return torch.stack(centres)


def multi_kmeans(
    tokens: "torch.Tensor",
    ks: list[int],
    iterations: int = 50,
    seed: int = 0,
    tolerance: float = 1e-4,
) -> dict[int, "torch.Tensor"]:
    """Lloyd k-means of `tokens` (N, D) for every k in `ks` in shared passes; returns {k: (k, D)}.

    Stops when no centre moves by more than `tolerance` times the mean token norm, or after
    `iterations` passes. Empty clusters are re-seeded with the tokens farthest from their centres.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = tokens.float()
    n = tokens.shape[0]
    centres = {k: _plus_plus(tokens, k, generator) for k in ks}
    offsets = {}
    start = 0
    for k in ks:
        offsets[k] = (start, start + k)
        start += k
    token_norm = tokens.norm(dim=1).mean().clamp_min(1e-12)
    for _ in range(iterations):
        stacked = torch.cat([centres[k] for k in ks])
        squared = (stacked**2).sum(dim=1)
        sums = {k: torch.zeros_like(centres[k], dtype=torch.float64) for k in ks}
        counts = {k: torch.zeros(k, dtype=torch.float64, device=tokens.device) for k in ks}
        far = {k: (torch.empty(0, device=tokens.device), torch.empty(0, dtype=torch.long, device=tokens.device)) for k in ks}
        for begin in range(0, n, CHUNK_TOKENS):
            chunk = tokens[begin : begin + CHUNK_TOKENS]
            distance = squared[None, :] - 2.0 * chunk @ stacked.T + (chunk**2).sum(dim=1, keepdim=True)
            for k in ks:
                lo, hi = offsets[k]
                best, label = distance[:, lo:hi].min(dim=1)
                sums[k].index_add_(0, label, chunk.double())
                counts[k] += torch.bincount(label, minlength=k).double()
                values = torch.cat([far[k][0], best])
                indices = torch.cat([far[k][1], torch.arange(begin, begin + chunk.shape[0], device=tokens.device)])
                top = values.topk(min(k, values.shape[0])).indices
                far[k] = (values[top], indices[top])
        moved = 0.0
        for k in ks:
            updated = (sums[k] / counts[k].clamp_min(1.0)[:, None]).float()
            empty = counts[k] == 0
            if bool(empty.any()):
                updated[empty] = tokens[far[k][1][: int(empty.sum())]]
            moved = max(moved, float((updated - centres[k]).norm(dim=1).max()))
            centres[k] = updated
        if moved <= tolerance * float(token_norm):
            break
    return centres
