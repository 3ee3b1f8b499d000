"""Dataset reading, joint augmentations, losses with ignored pixels, schedules and parameter groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsiseg.config import AUGMENTATIONS
from wsiseg.errors import WsisegError
from wsiseg.train.augment import TrainTransform
from wsiseg.train.choices import LOSSES, OPTIMIZERS
from wsiseg.train.data import SegmentationDataset, read_image, read_mask
from wsiseg.train.losses import CombinedLoss
from wsiseg.train.trainer import build_optimizer, lr_factor, parameter_groups


def _palette_png(path: Path, values: np.ndarray) -> Path:
    image = Image.fromarray(values.astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    image.save(path)
    return path


def test_masks_are_read_as_indices(tmp_path: Path) -> None:
    values = np.array([[0, 1, 2], [2, 1, 255]])
    assert read_mask(_palette_png(tmp_path / "p.png", values), 3, 255).tolist() == values.tolist()
    grey_rgb = np.repeat(values[..., None], 3, axis=2).astype(np.uint8)
    Image.fromarray(grey_rgb).save(tmp_path / "rgb.png")
    assert read_mask(tmp_path / "rgb.png", 3, 255).tolist() == values.tolist()


def test_mask_errors_name_the_file(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).save(tmp_path / "binary.png")
    with pytest.raises(WsisegError, match=r"binary.png holds values 255 .*0/255 binary mask"):
        read_mask(tmp_path / "binary.png", 2, ignore_index=254)
    _palette_png(tmp_path / "four.png", np.array([[0, 4]]))
    with pytest.raises(WsisegError, match=r"four.png holds values 4 outside 0..2"):
        read_mask(tmp_path / "four.png", 3, 255)
    colour = np.zeros((2, 2, 3), dtype=np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(WsisegError, match="colour.png is a colour"):
        read_mask(tmp_path / "colour.png", 3, 255)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(WsisegError, match="cannot read image .*broken.jpg"):
        read_image(tmp_path / "broken.jpg")


def test_size_mismatch_is_an_error(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    _palette_png(tmp_path / "mask.png", np.zeros((10, 11)))
    dataset = SegmentationDataset([{"image": tmp_path / "image.png", "mask": tmp_path / "mask.png"}], 3)
    with pytest.raises(WsisegError, match="mask .*mask.png is 11x10 but image .*image.png is 12x10"):
        dataset[0]


def test_every_augmentation_moves_image_and_mask_together() -> None:
    torch.manual_seed(0)
    mask = torch.randint(0, 4, (6, 7)).repeat_interleave(12, 0).repeat_interleave(12, 1)  # 72 x 84, 12 px blocks
    image = (mask.float() / 3).expand(3, -1, -1).clone()
    for name in AUGMENTATIONS:
        for _ in range(3):
            out_image, out_mask = TrainTransform(48, {name: 1.0})(image, mask)
            assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48), name
            assert 0 <= float(out_image.min()) and float(out_image.max()) <= 1, name
            assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3, 255}, name
            if name in ("random_resized_crop", "hflip", "vflip", "rotate90", "transpose", "elastic",
                        "grid_distortion", "optical_distortion"):
                valid = out_mask != 255
                agree = (torch.round(out_image[0] * 3).long() == out_mask)[valid].float().mean()
                assert agree > 0.9, (name, float(agree))


def test_small_images_are_padded_with_ignore() -> None:
    image, mask = torch.rand(3, 20, 30), torch.zeros(20, 30, dtype=torch.long)
    out_image, out_mask = TrainTransform(32, {})(image, mask)
    assert out_image.shape == (3, 32, 32)
    assert int((out_mask == 255).sum()) == 32 * 32 - 20 * 30


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_ignore_the_ignore_index(name: str) -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :3] = 255
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = CombinedLoss({name: 1.0}, 3)
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value)
    assert float(logits.grad[:, :, :3].abs().sum()) == 0.0
    changed = logits.detach().clone()
    changed[:, :, :3] = torch.randn(2, 3, 3, 8) * 10
    assert float(loss(changed, target)) == pytest.approx(value.item(), rel=1e-5)
    perfect = torch.nn.functional.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float() * 30
    assert loss(perfect, target).item() < 0.05
    assert loss(logits, torch.full_like(target, 255)).item() == 0.0


def test_weighted_sum_of_losses() -> None:
    logits, target = torch.randn(1, 2, 4, 4), torch.randint(0, 2, (1, 4, 4))
    both = CombinedLoss({"cross_entropy": 1.0, "dice": 0.5}, 2)
    total = float(both(logits, target))
    assert total == pytest.approx(both.last["cross_entropy"] + 0.5 * both.last["dice"], rel=1e-5)
    with pytest.raises(WsisegError, match="class_weights has 3 values for 2 classes"):
        CombinedLoss({"cross_entropy": 1.0, "class_weights": [1, 2, 3]}, 2)


def test_schedules_warm_up_per_iteration_and_end_at_the_floor() -> None:
    from dataclasses import replace

    from wsiseg.config_types import TrainingConfig

    training = TrainingConfig(epochs=10, warmup_epochs=1, min_lr_ratio=0.01, scheduler="cosine", poly_power=0.9,
                              step_epochs=4, step_gamma=0.1)
    factors = [lr_factor(step, training, 20) for step in range(200)]
    assert 0 < factors[0] < 0.1  # never zero in the first epoch
    assert factors[19] == pytest.approx(20 / 21)
    assert max(factors) == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.01, abs=2e-3)
    assert all(a >= b for a, b in zip(factors[20:], factors[21:]))
    step = [lr_factor(s, replace(training, scheduler="step"), 20) for s in (20, 79, 80, 160)]
    assert step == pytest.approx([1.0, 1.0, 0.1, 0.01])
    assert lr_factor(199, replace(training, scheduler="poly"), 20) < 0.05
    assert [lr_factor(s, replace(training, scheduler="none"), 20) for s in (0, 20, 199)] == [1 / 21, 1.0, 1.0]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_is_built_by_its_name(name: str) -> None:
    from wsiseg.config_types import TrainingConfig

    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.01}]
    optimizer = build_optimizer(groups, TrainingConfig(optimizer=name, lr=0.5))
    assert type(optimizer).__name__.lower() == name and optimizer.param_groups[0]["lr"] == 0.5


def test_parameter_groups_split_decay_and_backbone_lr() -> None:
    model = torch.nn.Module()
    model.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model.decoder = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1), torch.nn.LayerNorm(2))
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-3, backbone_lr=1e-4, weight_decay=0.05)}
    assert groups["backbone"]["lr"] == 1e-4 and groups["backbone"]["weight_decay"] == 0.05
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and len(groups["backbone_no_decay"]["params"]) == 3
    assert groups["decoder"]["lr"] == 1e-3 and len(groups["decoder"]["params"]) == 1
    assert len(groups["decoder_no_decay"]["params"]) == 3


def test_demo_dataset_appears_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from wsiseg.train import demo_data

    final = tmp_path / "demo"
    save_mask = demo_data._save_mask

    def failing(mask: np.ndarray, path: Path) -> None:
        assert not final.exists(), "tiles were written into the shared folder before it was complete"
        raise OSError("disk full")

    monkeypatch.setattr(demo_data, "_save_mask", failing)
    with pytest.raises(OSError, match="disk full"):
        demo_data.prepare_demo_dataset(final)
    assert list(tmp_path.iterdir()) == []  # nothing half-built left behind

    def watching(mask: np.ndarray, path: Path) -> None:
        assert not final.exists(), "tiles were written into the shared folder before it was complete"
        save_mask(mask, path)

    monkeypatch.setattr(demo_data, "_save_mask", watching)
    json_path = demo_data.prepare_demo_dataset(final)
    document = json.loads(json_path.read_text())
    assert [len(document[split]) for split in ("train", "val", "test")] == [16, 4, 3]
    assert len(list((final / "images").glob("*.png"))) == len(list((final / "masks").glob("*.png"))) == 23
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert demo_data.prepare_demo_dataset(final) == json_path
    monkeypatch.setattr(demo_data, "_save_mask", save_mask)
    (tmp_path / "stray" / "images").mkdir(parents=True)
    with pytest.raises(WsisegError, match="holds no dataset.json"):
        demo_data.prepare_demo_dataset(tmp_path / "stray")
