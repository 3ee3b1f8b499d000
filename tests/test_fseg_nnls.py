"""The batched projection equals scipy's per-token NNLS and never touches the caller's bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

from wsiseg.fseg.modes import concept_scores, nearest, nmf
from wsiseg.fseg.nnls import project


def reference(tokens: np.ndarray, concepts: np.ndarray) -> np.ndarray:
    return np.stack([scipy_nnls(concepts.T.astype(np.float64), t.astype(np.float64))[0] for t in tokens])


def positive_problem(rng: np.random.Generator, n: int, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated non-negative concepts and ReLU'd mixtures plus noise, like real F-Seg features."""
    concepts = np.maximum(rng.standard_normal((k, d)) + 1.0, 0).astype(np.float32)
    tokens = np.maximum(rng.random((n, k)) ** 3 @ concepts + rng.standard_normal((n, d)), 0).astype(np.float32)
    return tokens, concepts


@pytest.mark.parametrize("k,d", [(1, 5), (8, 64), (32, 320)])
def test_project_matches_scipy_on_nonnegative_features(k: int, d: int) -> None:
    tokens, concepts = positive_problem(np.random.default_rng(k), 400, k, d)
    weights = project(torch.from_numpy(tokens), torch.from_numpy(concepts)).numpy()
    expected = reference(tokens, concepts)
    assert weights.shape == (400, k)
    assert (weights >= 0).all()
    np.testing.assert_allclose(weights, expected, atol=1e-4, rtol=0)
    if k > 1:  # active constraints really occur, so the test exercises the pivoting
        assert 0 < (expected == 0).mean() < 1


def test_project_matches_scipy_on_signed_random_data() -> None:
    rng = np.random.default_rng(3)
    concepts = rng.standard_normal((16, 48)).astype(np.float32)
    tokens = rng.standard_normal((500, 48)).astype(np.float32)
    weights = project(torch.from_numpy(tokens), torch.from_numpy(concepts)).numpy()
    expected = reference(tokens, concepts)
    assert 0.3 < (expected == 0).mean() < 0.7
    np.testing.assert_allclose(weights, expected, atol=1e-4, rtol=0)


def test_project_feature_maps_keeps_layout_and_bank() -> None:
    tokens, concepts = positive_problem(np.random.default_rng(5), 2 * 3 * 4, 6, 20)
    maps = torch.from_numpy(tokens).reshape(2, 3, 4, 20).permute(0, 3, 1, 2)
    bank = torch.from_numpy(concepts)
    before = bank.clone()
    weights = project(maps, bank)
    assert weights.shape == (2, 6, 3, 4)
    assert torch.equal(bank, before)
    flat = weights.permute(0, 2, 3, 1).reshape(-1, 6).numpy()
    np.testing.assert_allclose(flat, reference(tokens, concepts), atol=1e-4, rtol=0)


def test_project_handles_zero_tokens_and_duplicate_concepts() -> None:
    rng = np.random.default_rng(9)
    concepts = np.abs(rng.standard_normal((4, 10))).astype(np.float32)
    concepts = np.concatenate([concepts, concepts[:1]])  # a duplicated concept: singular Gram matrix
    tokens = np.concatenate([np.zeros((3, 10), np.float32), np.abs(rng.standard_normal((50, 10))).astype(np.float32)])
    weights = project(torch.from_numpy(tokens), torch.from_numpy(concepts)).numpy()
    assert np.all(weights[:3] == 0)
    # the solution is not unique, but the fitted reconstruction and the residual are
    residual = np.linalg.norm(tokens - weights @ concepts, axis=1)
    expected = np.array([scipy_nnls(concepts.T.astype(np.float64), t.astype(np.float64))[1] for t in tokens])
    np.testing.assert_allclose(residual, expected, atol=1e-4)


def test_modes_shapes_and_meaning() -> None:
    rng = np.random.default_rng(11)
    concepts = torch.from_numpy(np.abs(rng.standard_normal((3, 16))).astype(np.float32))
    # each token is a scaled copy of one concept: every mode must pick that concept
    truth = torch.from_numpy(rng.integers(0, 3, size=(2, 5, 6)))
    features = (concepts[truth] * 2.5).permute(0, 3, 1, 2).contiguous()
    for mode in ("project", "nearest", "nmf"):
        scores = concept_scores(features, concepts, mode=mode)
        assert scores.shape == (2, 3, 5, 6)
        assert torch.equal(scores.argmax(dim=1), truth), mode
    scaled = concept_scores(features, concepts, scale_before_argmax=True)
    assert torch.allclose(scaled.amax(dim=(2, 3)), torch.ones(2, 3))
    assert nearest(features, concepts).max() <= 1.0 + 1e-5
    assert (nmf(features, concepts) >= 0).all()


@pytest.fixture(scope="module")
def real_tokens(samples: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU'd EfficientNet-Lite0 token features of two windows of the real CMU slide."""
    from wsiseg.fseg.features import load_extractor
    from wsiseg.slide import open_slide

    extractor = load_extractor(device="cpu")
    with open_slide(samples["cmu_svs"]) as slide:
        pixels = np.stack([slide.read(x, y, 384, 384, 0.5) for x, y in [(700, 1400), (300, 1900)]])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    features = extractor(batch)
    return tuple(f.reshape(f.shape[0], -1).T.contiguous() for f in features)  # type: ignore[return-value]


@pytest.mark.parametrize("k", [8, 32])
def test_project_matches_scipy_on_real_features(real_tokens: tuple[torch.Tensor, torch.Tensor], k: int) -> None:
    from wsiseg.fseg.kmeans import multi_kmeans

    fit_on, tokens = real_tokens
    bank = multi_kmeans(fit_on, [k], seed=0)[k]
    weights = project(tokens, bank).numpy()
    expected = reference(tokens.numpy(), bank.numpy())
    assert tokens.shape == (144, 320)
    assert 0 < (expected == 0).mean() < 1
    np.testing.assert_allclose(weights, expected, atol=1e-4, rtol=0)
