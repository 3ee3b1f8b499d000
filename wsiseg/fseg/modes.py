"""Per-token concept scores for a batch of feature maps: projection, nearest concept, or per-image NMF."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsiseg.choices import Choices
from wsiseg.fseg.nnls import project

if TYPE_CHECKING:
    import torch

MODES = Choices("F-Seg mode", {
    "project": "wsiseg.fseg.nnls:project",  # NNLS weights
    "nearest": "wsiseg.fseg.modes:nearest",  # cosine similarity
    "nmf": "wsiseg.fseg.modes:nmf",  # per-window factorisation matched to the bank
})
NMF_ITERATIONS = 100
_EPS = 1e-12


def nearest(features: "torch.Tensor", concepts: "torch.Tensor") -> "torch.Tensor":
    """Cosine similarity of every token (B, D, h, w) to every concept (k, D): (B, k, h, w); argmax = nearest."""
    import torch

    bank = torch.nn.functional.normalize(concepts.to(features.device, torch.float32), dim=1, eps=_EPS)
    tokens = torch.nn.functional.normalize(features.float(), dim=1, eps=_EPS)
    return torch.einsum("bdhw,kd->bkhw", tokens, bank)


def _match(components: "torch.Tensor", concepts: "torch.Tensor") -> list[int]:
    """Order of the NMF components that best matches the concepts (Hungarian, cosine similarity)."""
    import torch
    from scipy.optimize import linear_sum_assignment

    a = torch.nn.functional.normalize(components.double(), dim=1, eps=_EPS)
    b = torch.nn.functional.normalize(concepts.double(), dim=1, eps=_EPS)
    rows, cols = linear_sum_assignment(-(b @ a.T).cpu().numpy())
    order = [0] * len(rows)
    for concept, component in zip(rows, cols):
        order[concept] = int(component)
    return order


def nmf(features: "torch.Tensor", concepts: "torch.Tensor", iterations: int = NMF_ITERATIONS) -> "torch.Tensor":
    """A fresh factorisation per image, started from the bank, components matched back to the concepts.

    For each image the token matrix A (N, D) is factorised as W H with multiplicative updates,
    H starting at the bank and W at the projection of A on it; the components of H are then
    matched one-to-one to the concepts, and W's columns reordered so weight map i belongs to
    concept i. Returns (B, k, h, w).
    """
    import torch

    b, d, h, w = features.shape
    bank = concepts.to(features.device, torch.float32)
    start = project(features.float(), bank)
    out = torch.empty_like(start)
    for i in range(b):
        a = features[i].float().reshape(d, -1).T.clamp_min(0)
        weights = start[i].reshape(bank.shape[0], -1).T.clamp_min(_EPS)
        components = bank.clamp_min(_EPS).clone()
        for _ in range(iterations):
            components = components * (weights.T @ a) / (weights.T @ weights @ components + _EPS)
            weights = weights * (a @ components.T) / (weights @ (components @ components.T) + _EPS)
        order = _match(components, bank)
        out[i] = weights[:, order].T.reshape(-1, h, w)
    return out


def concept_scores(
    features: "torch.Tensor", concepts: "torch.Tensor", mode: str = "project", scale_before_argmax: bool = False
) -> "torch.Tensor":
    """Scores (B, k, h, w) of ReLU'd features (B, D, h, w) on concepts (k, D) in the given mode.

    With `scale_before_argmax` each image's map of each concept is divided by its maximum over
    that image, so weak but spatially distinct concepts can still win the argmax.
    """
    scores = MODES.load(mode)(features, concepts.to(features.device))
    if scale_before_argmax:
        peak = scores.amax(dim=(2, 3), keepdim=True)
        scores = scores / peak.clamp_min(_EPS)
    return scores.float()
