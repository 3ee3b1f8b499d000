"""The reference project's YAML dialect: each reference key read with its reference meaning.

Each test builds the real object the key drives (peft module, torch optimiser, schedule, loss,
loader, output folder) from a reference-style config, not just the translated dict.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.train_fixtures import make_dataset, reference_config
from wsiseg.config import apply_options, check_config, load_config, validate_config
from wsiseg.config import migrate_config
from wsiseg.config_reference import model_name, normalise
from wsiseg.config_types import Config, TrainingConfig
from wsiseg.errors import WsisegError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, samples: dict[str, Path]) -> Path:
    return make_dataset(tmp_path_factory.mktemp("refdata"), samples)


def base(json_path: Path, tmp_path: Path, **changes: dict[str, Any]) -> dict[str, Any]:
    """The reference example config without weights (random lunit_vits8), with section changes merged in."""
    raw = reference_config(json_path, tmp_path / "none.pth", tmp_path / "logs")
    del raw["model"]["pfm_weights_path"]
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return raw


def read(raw: dict[str, Any]) -> dict[str, Any]:
    return validate_config(copy.deepcopy(raw), splits=())


def tiny_segmenter(config: dict[str, Any]) -> Any:
    from wsiseg.models.segmenter import build_segmenter

    return build_segmenter(config["model"], config["dataset"]["num_classes"], depth=1)


def lora_layers(model: Any) -> list[Any]:
    return [m for m in model.backbone.modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0]


def test_lora_alpha_is_the_reference_scale_on_the_real_peft_module(dataset: Path, tmp_path: Path) -> None:
    for rank, alpha in ((4, 1.0), (8, 0.5), (16, 2.0)):
        raw = base(dataset, tmp_path, model={"finetune_mode": {"type": "lora", "rank": rank, "alpha": alpha}})
        config = read(raw)
        assert config["model"]["finetune_mode"] == "lora" and config["model"]["lora_r"] == rank
        layers = lora_layers(tiny_segmenter(config))
        assert layers
        for layer in layers:
            assert layer.scaling["default"] == pytest.approx(alpha)  # update B.A scaled by alpha, as the reference
            assert layer.lora_A["default"].weight.shape[0] == rank


def test_dora_full_and_frozen_modes(dataset: Path, tmp_path: Path) -> None:
    dora = tiny_segmenter(read(base(dataset, tmp_path, model={"finetune_mode": {"type": "DoRA", "rank": 4, "alpha": 1}})))
    assert dora.backbone.peft_config["default"].use_dora
    assert all(len(layer.lora_magnitude_vector) for layer in lora_layers(dora))
    full = tiny_segmenter(read(base(dataset, tmp_path, model={"finetune_mode": {"type": "full"}})))
    assert all(p.requires_grad for p in full.backbone.parameters())
    frozen = tiny_segmenter(read(base(dataset, tmp_path, model={"finetune_mode": {"type": "frozen"}})))
    assert not any(p.requires_grad for p in frozen.backbone.parameters())


@pytest.mark.parametrize("mode", ["cnn_adapter", "transformer_adapter"])
def test_adapter_modes_fail_clearly(dataset: Path, tmp_path: Path, mode: str) -> None:
    raw = base(dataset, tmp_path, model={"finetune_mode": {"type": mode, "rank": 4, "alpha": 1.0}})
    with pytest.raises(WsisegError, match=f"'{mode}'.*not implemented in wsiseg; use lora, dora, full or frozen"):
        read(raw)
    raw = base(dataset, tmp_path, model={mode: {"channels": 64}})
    with pytest.raises(WsisegError, match=f"model.{mode} configures the reference's {mode} mode"):
        read(raw)


@pytest.mark.parametrize("given, name", [("PathOrchestra", "pathorchestra"), ("kaiko-vitl14", "kaiko-vitl14"),
                                         ("lunit_vits8", "lunit_vits8"), ("H-optimus-0", "hoptimus_0"),
                                         ("Patho3DMatrix-Vision", "patho3dmatrix-vision"), ("UNI_V1", "uni_v1")])
def test_pfm_name_spellings(given: str, name: str) -> None:
    assert model_name(given) == name


def test_emb_dim_is_checked_against_the_model(dataset: Path, tmp_path: Path) -> None:
    assert read(base(dataset, tmp_path))["model"]["emb_dim"] == 384
    with pytest.raises(WsisegError, match="model.emb_dim is 1024 but lunit_vits8 has embed dim 384"):
        read(base(dataset, tmp_path, model={"emb_dim": 1024}))
    raw = base(dataset, tmp_path, model={"pfm_name": "PathOrchestra", "emb_dim": 1024})
    assert read(raw)["model"]["name"] == "pathorchestra"


@pytest.mark.parametrize("where", ["optimizer", "training"])
def test_sgd_momentum_nesterov_weight_decay_wherever_the_reference_puts_them(dataset: Path, tmp_path: Path,
                                                                            where: str) -> None:
    from wsiseg.train.trainer import build_optimizer, parameter_groups

    settings = {"momentum": 0.8, "nesterov": False, "weight_decay": 0.05}
    raw = base(dataset, tmp_path)
    raw["training"]["optimizer"] = {"type": "sgd"}
    del raw["training"]["weight_decay"]
    (raw["training"]["optimizer"] if where == "optimizer" else raw["training"]).update(settings)
    config = read(raw)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    training = TrainingConfig(**config["training"])
    optimizer = build_optimizer(parameter_groups(model, training.lr, None, training.weight_decay), training)
    assert type(optimizer) is torch.optim.SGD
    group = next(g for g in optimizer.param_groups if g["name"] == "decoder")
    assert (group["momentum"], group["nesterov"], group["weight_decay"], group["lr"]) == (0.8, False, 0.05, 0.001)
    nesterov = read(base(dataset, tmp_path))  # the example: SGD, momentum 0.9, nesterov true
    optimizer = build_optimizer(parameter_groups(model, 0.1, None, 0.0), TrainingConfig(**nesterov["training"]))
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("given, expected", [("SGD", torch.optim.SGD), ("Adam", torch.optim.Adam),
                                             ("ADAMW", torch.optim.AdamW), ("adamw", torch.optim.AdamW)])
def test_optimizer_type_in_any_case(dataset: Path, tmp_path: Path, given: str, expected: type) -> None:
    from wsiseg.train.trainer import build_optimizer

    config = read(base(dataset, tmp_path, training={"optimizer": {"type": given}}))
    training = TrainingConfig(**config["training"])
    assert type(build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], training)) is expected


def test_cosine_and_step_schedules_with_warmup_epochs(dataset: Path, tmp_path: Path) -> None:
    from wsiseg.train.trainer import lr_factor

    config = read(base(dataset, tmp_path, training={"epochs": 10, "scheduler": {"type": "cosine", "warmup_epochs": 2}}))
    training, steps = TrainingConfig(**config["training"]), 5
    factors = [lr_factor(step, training, steps) for step in range(10 * steps)]
    assert factors[0] > 0 and factors[:10] == sorted(factors[:10])  # linear warmup over 2 epochs, never 0
    assert max(factors) == pytest.approx(1.0, abs=1e-3) and factors.index(max(factors)) in (9, 10)
    assert factors[10:] == sorted(factors[10:], reverse=True) and factors[-1] < 0.05
    step = read(base(dataset, tmp_path, training={"epochs": 10, "scheduler": {"type": "Step", "warmup_epochs": 0}}))
    assert step["training"]["scheduler"] == "step" and step["training"]["warmup_epochs"] == 0
    assert lr_factor(0, TrainingConfig(**step["training"]), steps) == 1.0


@pytest.mark.parametrize("kind", ["cross_entropy", "dice", "ohem", "iou"])
def test_loss_type(dataset: Path, tmp_path: Path, kind: str) -> None:
    from wsiseg.train import losses

    config = read(base(dataset, tmp_path, training={"loss": {"type": kind}}))
    loss = losses.CombinedLoss(config["training"]["loss"], 4)
    assert loss.weights == {kind: 1.0}
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    direct = {"cross_entropy": losses.cross_entropy, "dice": losses.dice_loss, "ohem": losses.ohem_loss,
              "iou": losses.iou_loss}[kind](logits, target)
    torch.testing.assert_close(loss(logits, target), direct)


def test_use_amp(dataset: Path, tmp_path: Path) -> None:
    from wsiseg.engine.predictors import autocast_dtype

    on = read(base(dataset, tmp_path, training={"use_amp": True}))["system"]["precision"]
    off = read(base(dataset, tmp_path, training={"use_amp": False}))["system"]["precision"]
    assert (on, off) == ("auto", "fp32")
    assert autocast_dtype("cpu", on) is None  # mixed precision asked for on a CPU trains in fp32
    assert autocast_dtype("cpu", off) is None


def test_accumulation_clipping_crop_and_validation_size(dataset: Path, tmp_path: Path) -> None:
    config = read(base(dataset, tmp_path, training={"accumulate_grad_batches": 4, "clip_grad_norm": 2.5,
                                                     "augmentation": {"RandomResizedCropSize": 96}},
                       validation={"augmentation": {"ResizedSize": 128}}))
    assert (config["training"]["grad_accum"], config["training"]["clip_grad"]) == (4, 2.5)
    assert config["training"]["crop_size"] == 96
    assert (config["model"]["input_size"], config["validation"]["mode"]) == (128, "resize")
    crop_only = read(base(dataset, tmp_path, validation={"augmentation": {}},
                          training={"augmentation": {"RandomResizedCropSize": 96}, "clip_grad_norm": None}))
    assert crop_only["model"]["input_size"] == 96 and crop_only["training"]["clip_grad"] == 0
    with pytest.raises(WsisegError, match=r"training.augmentation.RandomResizedCropSize \(read as training.crop_size\) "
                                          r"100 is not a multiple of 8"):
        read(base(dataset, tmp_path, training={"augmentation": {"RandomResizedCropSize": 100}}))


def test_intervals_samples_and_output_folder(dataset: Path, tmp_path: Path) -> None:
    config = read(base(dataset, tmp_path, validation={"eval_interval": 3},
                       visualization={"save_interval": 2, "num_vis_samples": 5},
                       logging={"log_dir": "somewhere/logs", "experiment_name": "exp1"}))
    assert config["validation"]["every"] == 3
    assert (config["visualization"]["every"], config["visualization"]["num_samples"]) == (2, 5)
    assert Path(config["logging"]["output_dir"]) == Path("somewhere/logs/exp1")


def test_pin_memory_reaches_the_training_loader(dataset: Path, tmp_path: Path) -> None:
    from wsiseg.train.data import SegmentationDataset, split_entries
    from wsiseg.train.trainer import Distributed, Trainer

    for pin, device, pinned in ((True, "cuda", True), (False, "cuda", False), (None, "cuda", True),
                                (True, "cpu", False), (None, "cpu", False)):
        config = read(base(dataset, tmp_path, system={"pin_memory": pin}))
        trainer = Trainer.__new__(Trainer)
        trainer.cfg, trainer.dist, trainer.device = Config.from_dict(config), Distributed(), torch.device(device)
        trainer.train_set = SegmentationDataset(split_entries(dataset, "train"), 4)
        trainer.loader_generator = torch.Generator()
        assert trainer._loader().pin_memory is pinned, (pin, device)


def test_pin_memory_on_a_cpu_run_is_no_torch_warning(dataset: Path, tmp_path: Path) -> None:
    """The reference's configs set `pin_memory: true`; on a CPU-only run that pins nothing and says nothing."""
    from wsiseg.train.data import SegmentationDataset, split_entries
    from wsiseg.train.trainer import Distributed, Trainer

    config = read(base(dataset, tmp_path, system={"pin_memory": True}))
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.dist, trainer.device = Config.from_dict(config), Distributed(), torch.device("cpu")
    trainer.train_set = SegmentationDataset(split_entries(dataset, "train"), 4)
    trainer.loader_generator = torch.Generator()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        next(iter(trainer._loader()))


def test_every_problem_at_once_in_the_reference_dialect(dataset: Path, tmp_path: Path) -> None:
    raw = base(dataset, tmp_path)
    raw["training"]["learning_rat"] = 0.1
    raw["model"]["finetune_mode"]["rnak"] = 4
    raw["training"]["optimizer"]["type"] = "sgdd"
    raw["model"]["eval_interval"] = 2
    raw["training"]["loss"]["type"] = "dise"
    raw["training"]["lr"] = 0.01
    raw["validation"]["ResizedSize"] = 64
    with pytest.raises(WsisegError) as error:
        read(raw)
    message = str(error.value)
    assert "7 problems" in message and "\n" not in message
    assert "unknown key 'validation.ResizedSize' (it belongs in 'validation.augmentation')" in message
    assert "unknown key 'training.learning_rat' (did you mean 'learning_rate'?)" in message
    assert "unknown key 'model.finetune_mode.rnak' (did you mean 'rank'?)" in message
    assert "training.optimizer.type is 'sgdd'; choose one of sgd, adam, adamw (did you mean 'sgd'?)" in message
    assert "'model.eval_interval' (it belongs in section 'validation')" in message
    assert "training.loss.type is 'dise'" in message and "did you mean 'dice'" in message
    assert "training.learning_rate (reference) and training.lr (native) set the same thing; keep one" in message


def test_reference_keys_are_noted_once_each(dataset: Path, tmp_path: Path) -> None:
    config, notes = check_config(base(dataset, tmp_path), splits=())
    assert "model.finetune_mode.alpha 1.0 -> model.lora_alpha 4.0" in notes
    assert "training.optimizer.type 'SGD' -> training.optimizer 'sgd'" in notes
    assert len(notes) == len(set(notes))
    native = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("configs", "demo.yaml").read_text())
    assert check_config(native, splits=(), check_files=False).reference_keys == []


def test_options_override_any_key_with_yaml_values(dataset: Path, tmp_path: Path) -> None:
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(base(dataset, tmp_path)))
    config = load_config(path, options=["training.learning_rate=2e-3", "model.finetune_mode.rank=8",
                                        "training.optimizer={type: adam}", "system.pin_memory=true"])
    assert config["training"]["lr"] == pytest.approx(2e-3)
    assert (config["model"]["lora_r"], config["model"]["lora_alpha"]) == (8, 8.0)
    assert config["training"]["optimizer"] == "adam" and config["system"]["pin_memory"] is True
    with pytest.raises(WsisegError, match="is not key.path=value"):
        apply_options({}, ["training.epochs"])
    native = load_config(path, options=["training.lr=0.5", "model.name=kaiko-vits8"])  # the other dialect's key
    assert (native["training"]["lr"], native["model"]["name"]) == (0.5, "kaiko-vits8")


def test_the_same_value_in_both_places_is_no_conflict(dataset: Path, tmp_path: Path) -> None:
    raw = base(dataset, tmp_path)
    raw["training"]["momentum"] = 0.9  # where the reference's code reads it, besides optimizer.momentum
    assert read(raw)["training"]["momentum"] == 0.9
    raw["training"]["momentum"] = 0.5
    with pytest.raises(WsisegError, match="training.optimizer.momentum .reference. and training.momentum"):
        read(raw)


def test_migrate_writes_the_native_equivalent(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    raw = base(dataset, tmp_path)
    raw["dataset"]["json_file"] = str(Path("..") / dataset.parent.name / dataset.name)
    (tmp_path / "old").mkdir()
    old = tmp_path / "old" / "ref.yaml"
    old.write_text(yaml.safe_dump(raw))
    (tmp_path / "new").mkdir()
    new = tmp_path / "new" / "deeper" / "native.yaml"
    new.parent.mkdir()
    text = migrate_config(old, new)
    migrated = yaml.safe_load(new.read_text())
    assert text.startswith("# native wsiseg config migrated from ref.yaml")
    assert normalise(migrated).notes == [] and "pfm_name" not in migrated["model"]
    assert migrated["model"]["lora_alpha"] == 4.0 and migrated["training"]["loss"] == {"dice": 1.0}
    assert load_config(new) == load_config(old)
    with pytest.raises(WsisegError, match="already exists"):
        migrate_config(old, new)


def test_dataset_json_layouts_read_alike(dataset: Path, tmp_path: Path) -> None:
    from wsiseg.train.dataset_json import read_dataset_json

    flat = json.loads(dataset.read_text())
    nested = dataset.parent / "nested.json"
    nested.write_text(json.dumps({"num_classes": 4, "data": flat}))
    a, b = read_dataset_json(dataset), read_dataset_json(nested)
    assert (a.layout, b.layout, b.num_classes) == ("flat", "reference", 4)
    assert a.splits == b.splits and b.entries("train")[0]["image"] == dataset.parent / "images" / "train_0.png"
    both = dataset.parent / "both.json"
    both.write_text(json.dumps({"data": flat, "train": flat["train"]}))
    with pytest.raises(WsisegError, match="both \"data\" and top-level train lists; keep one layout"):
        read_dataset_json(both)


def test_dataset_json_class_count_is_checked_against_the_config(dataset: Path, tmp_path: Path) -> None:
    nested = dataset.parent / "five.json"
    nested.write_text(json.dumps({"num_classes": 5, "data": json.loads(dataset.read_text())}))
    raw = base(dataset, tmp_path, dataset={"json_file": str(nested)})
    with pytest.raises(WsisegError, match="number of classes disagrees.*num_classes in five.json = 5"):
        validate_config(raw)


def test_test_items_without_masks_and_paths_relative_to_the_json(dataset: Path) -> None:
    from wsiseg.train.data import split_entries

    document = json.loads(dataset.read_text())
    document["test"][0]["mask_path"] = None
    del document["test"][1]["mask_path"]
    moved = dataset.parent / "masks" / "elsewhere.json"  # a JSON in another folder: paths follow it
    for item in document["train"] + document["val"] + document["test"]:
        for key in ("image_path", "mask_path"):
            if item.get(key):
                item[key] = f"../{item[key]}"
    moved.write_text(json.dumps({"num_classes": 4, "data": document}))
    test = split_entries(moved, "test", need_masks=False)
    assert [entry["mask"] for entry in test] == [None, None]
    assert test[0]["image"] == (dataset.parent / "images" / "test_0.png").resolve()
    with pytest.raises(WsisegError, match="every test image needs a mask"):
        split_entries(moved, "test")
    assert split_entries(moved, "train")[0]["mask"].is_file()


def test_readme_table_lists_every_reference_key() -> None:
    from wsiseg.config_reference import TABLE

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("### The reference dialect"):]
    for row in TABLE:
        assert row.reference.rsplit(".", 1)[1] in table, row.reference


def test_odd_values_give_one_problem_each(dataset: Path, tmp_path: Path) -> None:
    raw = base(dataset, tmp_path, model={"pfm_name": 3}, validation={"augmentation": None},
               training={"augmentation": [64], "optimizer": "AdamW", "scheduler": "Cosine"})
    with pytest.raises(WsisegError) as error:
        read(raw)
    message = str(error.value)
    assert "2 problems" in message  # no "missing model.name" after the refused pfm_name
    assert "model.pfm_name must be a model name, got 3" in message
    assert "training.augmentation must be a mapping of its keys, got [64]" in message
    raw["model"]["pfm_name"], raw["training"]["augmentation"] = "lunit_vits8", {}
    config = read(raw)  # native names in any case too; empty reference mappings are fine
    assert (config["training"]["optimizer"], config["training"]["scheduler"]) == ("adamw", "cosine")
