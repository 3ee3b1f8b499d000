"""The one real pretrained backbone: ImageNet EfficientNet-Lite0 remapped into timm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from skimage.data import chelsea

from wsiseg.errors import WsisegError
from wsiseg.models.features import normalize, token_features
from wsiseg.models.registry import build_backbone, get_spec
from wsiseg.models.segmenter import build_segmenter

EGYPTIAN_CAT = 285


def chelsea_batch() -> torch.Tensor:
    image = torch.from_numpy(chelsea()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)


def test_chelsea_is_an_egyptian_cat(samples: dict[str, Path]) -> None:
    model = build_backbone("efficientnet_lite0_imagenet", samples["efficientnet_lite0_pth"], "cpu", classifier=True)
    spec = get_spec("efficientnet_lite0_imagenet")
    with torch.no_grad():
        probabilities = model.eval()(normalize(chelsea_batch(), spec.mean, spec.std)).softmax(-1)[0]
    assert probabilities.argmax().item() == EGYPTIAN_CAT
    assert probabilities[EGYPTIAN_CAT] > 0.7  # 0.79 measured; symmetric-padding efficientnet_lite0 gives 0.62


def test_default_weights_and_features(samples: dict[str, Path]) -> None:
    trunk = build_backbone("efficientnet_lite0_imagenet", None, "cpu").eval()
    explicit = build_backbone("efficientnet_lite0_imagenet", samples["efficientnet_lite0_pth"], "cpu")
    assert torch.equal(trunk.conv_stem.weight, explicit.conv_stem.weight)
    assert trunk.conv_stem.weight.abs().sum() > 0
    x = normalize(chelsea_batch(), (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        assert token_features(trunk, x).shape == (1, 112, 14, 14)
        assert token_features(trunk, x, layer=-1).shape == (1, 320, 7, 7)


@pytest.mark.usefixtures("sample_cache")  # builds efficientnet_lite0_imagenet
def test_segmenter_on_efficientnet_non_square() -> None:
    model = build_segmenter({"name": "efficientnet_lite0_imagenet", "finetune_mode": "frozen", "input_size": 64}, 4)
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 64, 96)).shape == (1, 4, 64, 96)
    with pytest.raises(WsisegError, match="multiple of 32"):
        model(torch.rand(1, 3, 64, 80))


def test_other_weights_refused(tmp_path: Path) -> None:
    torch.save({"_conv_stem.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(WsisegError, match="another architecture"):
        build_backbone("efficientnet_lite0_imagenet", tmp_path / "other.pth", "cpu")


def test_default_weights_never_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wsiseg.samples

    def no_download(*args: object) -> None:
        raise AssertionError("building a backbone must not download")

    monkeypatch.setattr(wsiseg.samples, "_download", no_download)
    monkeypatch.setenv("WSISEG_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WsisegError, match="run `wsiseg samples` once"):
        build_backbone("efficientnet_lite0_imagenet", None, "cpu")
    assert not (tmp_path / "empty").exists()
