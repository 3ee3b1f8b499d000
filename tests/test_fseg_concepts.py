"""Concept banks: multi-k k-means, the safetensors bank file, and the published joblib banks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsiseg.errors import WsisegError
from wsiseg.fseg.concepts import ConceptBank, load_bank, save_bank
from wsiseg.fseg.kmeans import multi_kmeans
from wsiseg.fseg.sampling import sample_tokens

DATA = Path(__file__).parent / "data"


def blobs(rng: np.random.Generator, centres: np.ndarray, per: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(centres)), per)
    points = np.maximum(centres[labels] + 0.05 * rng.standard_normal((len(labels), centres.shape[1])), 0)
    return points.astype(np.float32), labels


def test_multi_kmeans_finds_clusters_for_every_k(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("wsiseg.fseg.kmeans.CHUNK_TOKENS", 97)  # several chunks per pass
    rng = np.random.default_rng(0)
    true = np.abs(rng.standard_normal((4, 8))) * 3
    points, labels = blobs(rng, true, 200)
    banks = multi_kmeans(torch.from_numpy(points), [2, 4, 7], seed=1)
    assert sorted(banks) == [2, 4, 7]
    for k, centres in banks.items():
        assert centres.shape == (k, 8)
        assert (centres >= 0).all()
    # k=4 recovers the true centres
    found = banks[4].numpy()
    distance = np.linalg.norm(true[:, None] - found[None], axis=2)
    assert distance.min(axis=1).max() < 0.05
    assert len(set(distance.argmin(axis=1))) == 4
    # every k=7 cluster is used (no empty cluster survives re-seeding)
    assign = np.linalg.norm(points[:, None] - banks[7].numpy()[None], axis=2).argmin(axis=1)
    assert len(np.unique(assign)) == 7


def test_multi_kmeans_is_deterministic_for_a_seed() -> None:
    points, _ = blobs(np.random.default_rng(2), np.eye(3, 5) * 4, 50)
    a = multi_kmeans(torch.from_numpy(points), [3], seed=5)[3]
    b = multi_kmeans(torch.from_numpy(points), [3], seed=5)[3]
    assert torch.equal(a, b)


def test_bank_round_trip_and_refusals(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    bank = ConceptBank({k: np.abs(rng.standard_normal((k, 6))).astype(np.float32) for k in (2, 4)},
                       model="efficientnet_lite0_imagenet", layer="3", mpp=0.5, window=256)
    path = save_bank(bank, tmp_path / "bank.safetensors")
    loaded = load_bank(path)
    assert loaded.ks == [2, 4] and loaded.feature_dim == 6
    assert (loaded.model, loaded.layer, loaded.mpp, loaded.window) == ("efficientnet_lite0_imagenet", "3", 0.5, 256)
    for k in (2, 4):
        np.testing.assert_array_equal(loaded.get(k), bank.concepts[k])
    # get() hands out a copy: changing it leaves the bank alone
    loaded.get(2)[:] = -1
    assert (loaded.get(2) >= 0).all()
    with pytest.raises(WsisegError, match="no k=8.*k = 2, 4"):
        loaded.get(8)
    with pytest.raises(WsisegError, match="already exists"):
        save_bank(bank, path)
    save_bank(bank, path, overwrite=True)
    with pytest.raises(WsisegError, match="6-long concepts but model efficientnet_lite0_imagenet gives 320"):
        loaded.check_compatible("efficientnet_lite0_imagenet", 320)
    with pytest.raises(WsisegError, match="fitted with model efficientnet_lite0_imagenet, not uni_v1"):
        loaded.check_compatible("uni_v1", 6)
    with pytest.raises(WsisegError, match="layer 3, not 4"):
        loaded.check_compatible("efficientnet_lite0_imagenet", 6, layer="4")
    loaded.check_compatible("efficientnet_lite0_imagenet", 6, layer="3")


@pytest.mark.parametrize("name", ["fseg_bank_joblib.pkl", "fseg_bank_joblib_zlib.pkl"])
def test_published_joblib_banks_load_without_joblib(name: str) -> None:
    # the files were written by joblib 1.6.0 (joblib.dump of {k: float32 (k, 12)}, plain and zlib)
    expected = np.load(DATA / "fseg_bank_expected.npz")
    bank = load_bank(DATA / name)
    assert bank.ks == [2, 3, 5] and bank.feature_dim == 12 and bank.model is None
    for k in bank.ks:
        np.testing.assert_array_equal(bank.get(k), expected[str(k)])
    bank.check_compatible("any_model", 12)  # unknown model: only the feature size is checked


def test_bad_bank_files(tmp_path: Path) -> None:
    with pytest.raises(WsisegError, match="does not exist"):
        load_bank(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a bank at all")
    with pytest.raises(WsisegError, match="is not a concept bank"):
        load_bank(junk)
    import pickle

    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps({8: __import__("os").getcwd}))
    with pytest.raises(WsisegError, match="refusing to load"):
        load_bank(hostile)


def test_cli_k_values_follow_the_issue_syntax(tmp_path: Path) -> None:
    """`fseg-fit SLIDE --k 8 16 32`: click hands 16 and 32 to the slide arguments; they come back as k values."""
    from wsiseg.cli.fseg import split_k_values

    slide = tmp_path / "a.svs"
    slide.touch()
    numbered = tmp_path / "64"
    numbered.touch()
    paths, ks = split_k_values((slide, Path("16"), Path("32"), numbered), ("8",))
    assert paths == [slide, numbered] and ks == [8, 16, 32]
    assert split_k_values((slide,), ("8,16", "4")) == ([slide], [8, 16, 4])
    assert split_k_values((slide, Path("16")), ()) == ([slide, Path("16")], [])


@pytest.mark.parametrize(("max_windows", "max_tokens"), [(0, 100), (-1, 100), (4, 0), (4, -5)])
def test_sampling_limits_below_one_are_user_errors(max_windows: int, max_tokens: int) -> None:
    with pytest.raises(WsisegError, match="--max-windows and --max-tokens must be at least 1"):
        sample_tokens([], None, 0.5, 256, max_windows=max_windows, max_tokens=max_tokens)


def test_banks_made_elsewhere_are_clipped_or_refused(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(7)
    raw = rng.standard_normal((4, 6)).astype(np.float32)
    bank = ConceptBank({4: raw})
    with caplog.at_level("WARNING", logger="wsiseg"):
        concepts = bank.projection_concepts(4)
    negative = raw < 0
    np.testing.assert_array_equal(concepts, np.where(negative, 0, raw))
    warnings = [r.getMessage() for r in caplog.records if "negative entries" in r.getMessage()]
    assert len(warnings) == 1
    assert f"{int(negative.sum())} negative entries" in warnings[0] and f"{raw.min():.4g}" in warnings[0]
    assert (bank.get(4) == raw).all()  # the bank itself is left alone
    broken = raw.copy()
    broken[2, 3] = np.nan
    broken[0, 1] = np.inf
    with pytest.raises(WsisegError, match="2 NaN or infinite entries .*concepts 0, 2"):
        ConceptBank({4: broken}).projection_concepts(4)
    with pytest.raises(WsisegError, match="no k=8"):
        bank.projection_concepts(8)
    with pytest.raises(WsisegError, match=r"k=4 entry must be a \(4, D\) matrix, got shape \(3, 6\)"):
        ConceptBank({4: raw[:3]})
    with pytest.raises(WsisegError, match="one feature length"):
        ConceptBank({4: raw, 2: raw[:2, :5]})


@pytest.mark.usefixtures("sample_cache")  # builds efficientnet_lite0_imagenet
def test_fseg_refuses_a_bank_of_another_feature_length(tmp_path: Path) -> None:
    import wsiseg

    rng = np.random.default_rng(1)
    save_bank(ConceptBank({4: np.abs(rng.standard_normal((4, 10))).astype(np.float32)}), tmp_path / "bank.safetensors")
    image = tmp_path / "he.png"
    from PIL import Image

    Image.fromarray(rng.integers(0, 200, (64, 64, 3), dtype=np.uint8)).save(image)
    with pytest.raises(WsisegError, match="10-long concepts but model efficientnet_lite0_imagenet gives 320"):
        wsiseg.fseg_slide(image, tmp_path / "out", k=4, bank=tmp_path / "bank.safetensors", slide_mpp=0.5,
                          window=64, device="cpu", tissue="all")


@pytest.mark.usefixtures("sample_cache")  # builds efficientnet_lite0_imagenet
def test_a_negative_bank_is_warned_about_once_per_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The early check of the bank (before the model loads) and the projection warn once together, not twice."""
    import wsiseg
    from PIL import Image

    rng = np.random.default_rng(2)
    raw = rng.standard_normal((4, 320)).astype(np.float32)
    save_bank(ConceptBank({4: raw}), tmp_path / "bank.safetensors")
    Image.fromarray(rng.integers(0, 200, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "he.png")
    with caplog.at_level("WARNING", logger="wsiseg"):
        wsiseg.fseg_slide(tmp_path / "he.png", tmp_path / "out", k=4, bank=tmp_path / "bank.safetensors",
                          slide_mpp=0.5, window=64, device="cpu", tissue="all", exports=(), show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if "negative entries" in r.getMessage()]
    assert warnings == [f"the concept bank's k=4 matrix has {int((raw < 0).sum())} negative entries (most negative "
                        f"{raw.min():.4g}): set to 0, as the F-Seg reference library does (concepts are non-negative)"]
