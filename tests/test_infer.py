"""Patch-level inference: window blending, resize mode, and `infer` outputs on real tiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_user_error, run_cli
from tests.train_fixtures import make_config, train_tiny
from wsiseg.errors import WsisegError
from wsiseg.engine.image import ImageInference, predict_resized, predict_windows, resize_rows, resized_shape
from wsiseg.metrics import MetricAccumulator
from wsiseg.train.infer import infer_images

pytestmark = pytest.mark.slow  # end to end: trains, or runs the CLI in subprocesses


def _pixelwise(batch: torch.Tensor) -> torch.Tensor:
    """A position-independent 'model': class scores from the pixel's own colour (softmax of R, G, B)."""
    return torch.softmax(batch * 5, dim=1)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("shape", [(50, 70), (20, 90), (13, 17)])
def test_blended_windows_equal_the_direct_prediction(shape: tuple[int, int], blend: str) -> None:
    torch.manual_seed(0)
    image = torch.rand(3, *shape)
    calls = []

    def predict(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.shape[0])
        assert batch.shape[-2:] == (32, 32)
        return _pixelwise(batch)

    blended = predict_windows(image, predict, window=32, overlap=0.25, blend=blend, batch_size=3)
    assert blended.shape == (3, *shape)
    torch.testing.assert_close(blended, _pixelwise(image[None])[0], rtol=1e-5, atol=1e-5)
    assert max(calls) <= 3


def test_blending_divides_by_summed_weights() -> None:
    image = torch.zeros(3, 32, 48)
    seen = []

    def predict(batch: torch.Tensor) -> torch.Tensor:
        # every window predicts a constant equal to its index: blended values stay within [0, n-1]
        out = torch.zeros(batch.shape[0], 1, 32, 32)
        for i in range(batch.shape[0]):
            out[i] = len(seen)
            seen.append(i)
        return out

    blended = predict_windows(image, predict, window=32, overlap=0.5, blend="constant", batch_size=8)
    # windows at x = 0 and 16: columns 16..31 are covered by both (mean 0.5), the rest by one
    assert torch.allclose(blended[0, :, :16], torch.tensor(0.0))
    assert torch.allclose(blended[0, :, 16:32], torch.tensor(0.5))
    assert torch.allclose(blended[0, :, 32:], torch.tensor(1.0))


def test_resize_mode_keeps_aspect_and_returns_original_size() -> None:
    assert resized_shape(300, 500, 256, 32) == (160, 256)
    image = torch.rand(3, 45, 77)
    shapes = []

    def predict(batch: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(batch.shape[-2:]))
        return _pixelwise(batch)

    scores = predict_resized(image, predict, 64, 16)
    assert scores.shape == (3, 45, 77) and shapes == [(32, 64)]


@pytest.mark.parametrize("size, shape", [((32, 48), (517, 771)), ((64, 64), (40, 50)), ((7, 5), (7, 5))])
def test_resize_back_in_stripes_is_exactly_the_whole_resize(size: tuple[int, int], shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    scores = torch.rand(3, *size)
    original = scores.clone()
    whole = resize_rows(scores, *shape)
    reference = torch.nn.functional.interpolate(scores[None], size=shape, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(whole, reference, rtol=0, atol=1e-5)  # torch's bilinear, half-pixel centres
    for stripe in (1, 7, 64, 100):
        pieces = [resize_rows(scores, *shape, row0, min(row0 + stripe, shape[0])) for row0 in range(0, shape[0], stripe)]
        assert torch.equal(torch.cat(pieces, dim=1), whole)
    assert torch.equal(scores, original)  # the input is not written to


def test_resize_mode_predicts_the_resized_image_and_resizes_back() -> None:
    image = torch.rand(3, 45, 77)

    def halves(batch: torch.Tensor) -> torch.Tensor:
        """Class 1 on the left half of what the model sees, class 0 on the right."""
        out = torch.zeros(batch.shape[0], 2, *batch.shape[-2:])
        out[:, 1, :, : batch.shape[-1] // 2] = 1
        out[:, 0, :, batch.shape[-1] // 2 :] = 1
        return out

    labels = predict_resized(image, halves, 64, 16).argmax(0)
    assert (labels[:, :38] == 1).all() and (labels[:, 39:] == 0).all()  # the boundary maps back to x = 38.5


@pytest.mark.parametrize("field, value, message", [("mode", "tiles", "unknown --resize_or_windowslide 'tiles'"),
                                                   ("overlap", 1.0, "--overlap must be in"),
                                                   ("batch_size", 0, "--batch_size must be at least 1")])
def test_inference_settings_are_checked(field: str, value: object, message: str) -> None:
    with pytest.raises(WsisegError, match=message):
        ImageInference(**{field: value})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, samples: dict[str, Path]) -> dict:
    return train_tiny(tmp_path_factory.mktemp("infer"), samples, epochs=1)


@pytest.mark.parametrize("mode", ["windowslide", "resize"])
def test_infer_writes_masks_at_original_size_and_consistent_metrics(tmp_path: Path, trained: dict, mode: str) -> None:
    checkpoint = Path(trained["output_dir"]) / "checkpoints" / "best_model.pth"
    out = tmp_path / "predictions"
    summary = infer_images(trained["config"], checkpoint, trained["json"], out,
                           ImageInference(mode=mode, size=64, batch_size=2), device="cpu")
    assert summary["images"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    document = json.loads(Path(trained["json"]).read_text())
    accumulator = MetricAccumulator(4)
    for entry in document["test"]:
        name = Path(entry["image_path"]).stem
        predicted = np.asarray(Image.open(out / "predictions_masks" / f"{name}.png"))
        truth = np.asarray(Image.open(Path(trained["json"]).parent / entry["mask_path"]))
        assert predicted.shape == truth.shape == (48, 80)
        assert (out / "predictions_overlays" / f"{name}.png").is_file()
        accumulator.update(predicted, truth)
    recomputed = accumulator.compute()
    assert metrics["confusion_matrix"] == recomputed["confusion_matrix"]
    for key in ("mdice", "miou", "pixel_acc", "dice_no_bg", "kappa"):
        assert metrics[key] == pytest.approx(recomputed[key], nan_ok=True)
    with pytest.raises(WsisegError, match="already exists"):
        infer_images(None, checkpoint, trained["json"], out, ImageInference(mode=mode), device="cpu")


def test_checkpoint_of_another_class_count_or_model(tmp_path: Path, trained: dict) -> None:
    checkpoint = Path(trained["output_dir"]) / "checkpoints" / "best_model.pth"
    five = make_config(tmp_path, trained["json"], dataset={"num_classes": 5, "class_names": None})
    with pytest.raises(WsisegError, match="dataset.num_classes = 4 but the config has 5"):
        infer_images(five, checkpoint, trained["json"], tmp_path / "a", device="cpu")
    other = make_config(tmp_path, trained["json"], backbone="timm:vit_tiny_patch16_224")
    result = run_cli("infer", "--config", other, "--checkpoint", checkpoint, "--input_json", trained["json"],
                     "--output_dir", tmp_path / "b", "--device", "cpu")
    assert_user_error(result, "model.name", "efficientnet_lite0_imagenet")


def test_unreadable_test_image_is_named(tmp_path: Path, trained: dict) -> None:
    document = json.loads(Path(trained["json"]).read_text())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    document["test"] = [{"image_path": str(broken)}]
    json_path = tmp_path / "broken.json"
    json_path.write_text(json.dumps(document))
    checkpoint = Path(trained["output_dir"]) / "checkpoints" / "best_model.pth"
    with pytest.raises(WsisegError, match="cannot read image .*broken.png"):
        infer_images(None, checkpoint, json_path, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_moved_pfm_weights_of_an_adapter_checkpoint_are_named_with_the_infer_fix(
        tmp_path: Path, samples: dict[str, Path]) -> None:
    """A LoRA checkpoint keeps only its adapter: infer rebuilds the backbone from the PFM weights it was trained on.
    When they moved, the one line says how infer takes the new place (a --config naming it), and that works."""
    import shutil

    import yaml

    from wsiseg.models import registry

    torch.manual_seed(0)
    weights = tmp_path / "pfm" / "vit.pth"
    weights.parent.mkdir()
    torch.save(registry.create("timm:test_vit", "cpu").state_dict(), weights)
    run = train_tiny(tmp_path / "train", samples, epochs=1, model={"name": "timm:test_vit", "finetune_mode": "lora",
                                                                     "input_size": 64, "pfm_weights_path": str(weights)})
    checkpoint = Path(run["output_dir"]) / "checkpoints" / "best_model.pth"
    moved = shutil.move(weights, tmp_path / "vit.pth")
    result = run_cli("infer", "--checkpoint", checkpoint, "--input_json", run["json"], "--output_dir", tmp_path / "a",
                     "--device", "cpu")
    assert_user_error(result, f"{weights} this checkpoint was trained on are not there",
                      "--config with model.pfm_weights_path")
    config = yaml.safe_load(Path(run["config"]).read_text())
    config["model"]["pfm_weights_path"] = str(moved)
    (tmp_path / "moved.yaml").write_text(yaml.safe_dump(config))
    summary = infer_images(tmp_path / "moved.yaml", checkpoint, run["json"], tmp_path / "b", device="cpu")
    assert summary["images"] == 2
