"""The published F-Seg library (PyPI `segf` 1.0.4) as an oracle for projecting onto a bank with negative entries.

segf pins old dependencies, so it is never installed: its source (`pip download --no-deps`) is unpacked
once into a cache folder and imported from there; scikit-learn, which it solves with, is a dev dependency.
The test is skipped with a message where segf cannot be downloaded. segf reaches its activations through a
forward-hook helper of pytorch-grad-cam; the test hands it the activations directly, so an empty stand-in
module is enough to import segf where that package is missing.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.oracles import oracle_site

pytest.importorskip("sklearn")

def _unpack_segf(scratch: Path, site: Path) -> None:
    with tarfile.open(next(scratch.glob("segf-*.tar.gz"))) as sdist:
        sdist.extractall(scratch, filter="data")
    (scratch / "segf-1.0.4" / "fseg").rename(site / "fseg")


def _fetch_segf() -> Path:
    """segf 1.0.4's source (no dependencies), unpacked once into the oracle cache."""
    return oracle_site("segf-1.0.4", [["--no-binary", ":all:", "segf==1.0.4"]], _unpack_segf)


def segf_module():
    """segf's fseg.fseg module, imported from the cache folder; skips when it cannot be had."""
    try:
        folder = str(_fetch_segf())
    except (subprocess.SubprocessError, OSError, StopIteration) as error:
        pytest.skip(f"segf 1.0.4 (the F-Seg oracle) cannot be downloaded here: {type(error).__name__}")
    try:
        import pytorch_grad_cam.activations_and_gradients  # noqa: F401
    except ImportError:
        package = types.ModuleType("pytorch_grad_cam")
        helper = types.ModuleType("pytorch_grad_cam.activations_and_gradients")
        helper.ActivationsAndGradients = object
        sys.modules.setdefault("pytorch_grad_cam", package)
        sys.modules.setdefault("pytorch_grad_cam.activations_and_gradients", helper)
    sys.path.insert(0, folder)
    try:
        return pytest.importorskip("fseg.fseg")
    finally:
        sys.path.remove(folder)


class GivenActivations:
    """What segf's FSeg.predict_project_concepts uses of `self`: the activations and the random state."""

    def __init__(self, activations: np.ndarray) -> None:
        self.activations = activations
        self.random_state = 0

    def get_activations(self, input_tensor: torch.Tensor) -> np.ndarray:
        return self.activations.copy()


def test_a_bank_with_negative_entries_gives_segf_labels(samples: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    from wsiseg.fseg.concepts import ConceptBank
    from wsiseg.fseg.features import load_extractor
    from wsiseg.fseg.kmeans import multi_kmeans
    from wsiseg.fseg.modes import concept_scores

    segf = segf_module()
    torch.manual_seed(0)
    image = np.asarray(Image.open(samples["hgsc_image"]).convert("RGB"))[400:656, 400:656]
    batch = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
    extractor = load_extractor("efficientnet_lite0_imagenet", layer=3, device="cpu")  # stride 16, 112 features
    features = extractor(batch)  # (1, 112, 16, 16), ReLU'd
    tokens = features[0].reshape(features.shape[1], -1).T
    centres = multi_kmeans(tokens, [6], seed=0)[6].numpy()
    rng = np.random.default_rng(0)
    raw = centres - 0.3 * centres.std() * np.abs(rng.standard_normal(centres.shape)).astype(np.float32)
    assert (raw < 0).mean() > 0.1  # a bank made elsewhere, with many negative entries

    reference = segf.FSeg.predict_project_concepts(GivenActivations(features.numpy()), batch, raw.copy())

    def labels(concepts: np.ndarray) -> np.ndarray:
        scores = concept_scores(features, torch.from_numpy(concepts), "project")
        return torch.nn.functional.interpolate(scores, size=(256, 256), mode="bilinear").argmax(1)[0].numpy()

    with caplog.at_level(logging.WARNING, logger="wsiseg"):
        clipped = ConceptBank({6: raw}).projection_concepts(6)
    agreement = (labels(clipped) == reference).mean()
    unclipped = (labels(raw) == reference).mean()
    # segf's coordinate-descent solver approximates the exact optimum wsiseg computes (~99.3-99.9% agreement)
    assert agreement > 0.99, agreement
    assert unclipped < agreement - 0.01, (unclipped, agreement)
    assert sum("negative entries" in r.getMessage() for r in caplog.records) == 1
