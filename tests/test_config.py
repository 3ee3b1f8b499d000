"""YAML config: defaults, every problem listed at once, cross-checks, paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.train_fixtures import make_config, make_dataset
from wsiseg.config import load_config, validate_config
from wsiseg.config_types import REQUIRED
from wsiseg.errors import WsisegError


@pytest.fixture()
def dataset(tmp_path: Path, samples: dict[str, Path]) -> Path:
    return make_dataset(tmp_path / "data", samples)


def _edit(path: Path, change) -> Path:
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))
    return path


def test_valid_config_gets_defaults(tmp_path: Path, dataset: Path) -> None:
    config = load_config(make_config(tmp_path, dataset))
    assert config["dataset"]["ignore_index"] == 255
    assert config["training"]["optimizer"] == "adamw"
    assert config["training"]["crop_size"] == 64
    assert config["training"]["loss"]["cross_entropy"] == 1.0
    assert config["validation"]["metric"] == "mdice"
    assert config["dataset"]["class_names"][3] == "neoplastic"


def test_misspelt_keys_all_listed_with_suggestions(tmp_path: Path, dataset: Path) -> None:
    def change(config: dict) -> None:
        config["trainig"] = {}
        config["training"]["learning_rat"] = 0.1
        config["training"]["optimizer"] = "adamm"
        config["model"]["epochs"] = 3
        config["training"]["augmentations"]["hflipp"] = 0.5
        config["training"]["loss"]["dise"] = 1.0

    path = _edit(make_config(tmp_path, dataset), change)
    with pytest.raises(WsisegError) as error:
        load_config(path)
    message = str(error.value)
    assert "6 problems" in message
    assert "unknown section 'trainig' (did you mean 'training'?)" in message
    assert "'model.epochs' (it belongs in section 'training')" in message
    assert "is 'adamm'; choose one of sgd, adam, adamw (did you mean 'adam'?)" in message
    assert "did you mean 'hflip'" in message
    assert "did you mean 'dice'" in message
    assert "\n" not in message


def test_num_classes_disagreement_names_every_source(tmp_path: Path, dataset: Path) -> None:
    document = json.loads(dataset.read_text())
    document["num_classes"] = 5
    dataset.write_text(json.dumps(document))
    path = make_config(tmp_path, dataset, model={"num_classes": 3})
    with pytest.raises(WsisegError, match="number of classes disagrees") as error:
        load_config(path)
    for part in ("dataset.num_classes = 4", "model.num_classes = 3", "num_classes in dataset.json = 5"):
        assert part in str(error.value)


def test_crop_size_must_fit_the_patch(tmp_path: Path, dataset: Path) -> None:
    path = make_config(tmp_path, dataset, model={"name": "timm:vit_tiny_patch16_224", "input_size": 100},
                       training={"crop_size": 90})
    with pytest.raises(WsisegError) as error:
        load_config(path)
    message = str(error.value)
    assert "model.input_size 100 is not a multiple of 16" in message and "use 96 or 112" in message
    assert "training.crop_size 90 is not a multiple of 16" in message


def test_missing_files_listed_at_once(tmp_path: Path, dataset: Path) -> None:
    (dataset.parent / "images" / "train_1.png").unlink()
    (dataset.parent / "masks" / "val_0.png").unlink()
    path = make_config(tmp_path, dataset, model={"pfm_weights_path": "nowhere/weights.pth"})
    with pytest.raises(WsisegError) as error:
        load_config(path)
    message = str(error.value)
    assert "3 problems" in message
    assert "train_1.png" in message and "val_0.png" in message and "weights.pth does not exist" in message


def test_empty_split_and_missing_json(tmp_path: Path, dataset: Path) -> None:
    document = json.loads(dataset.read_text())
    document["val"] = []
    dataset.write_text(json.dumps(document))
    with pytest.raises(WsisegError, match="split 'val' .* is empty"):
        load_config(make_config(tmp_path, dataset))
    with pytest.raises(WsisegError, match="does not exist"):
        load_config(make_config(tmp_path, tmp_path / "absent.json"))


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, dataset: Path, monkeypatch) -> None:
    path = make_config(dataset.parent, Path("dataset.json"), training={"lr": "1e-4"})
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert Path(config["dataset"]["json"]) == dataset.resolve()
    assert config["training"]["lr"] == pytest.approx(1e-4)  # YAML 1.1 reads "1e-4" as a string


def test_type_and_range_errors() -> None:
    raw = {"dataset": {"json": "x.json", "num_classes": "four"}, "model": {"name": "efficientnet_lite0_imagenet"},
           "training": {"epochs": 0, "augmentations": {"hflip": 2}}, "system": {"precision": "fp8"}}
    with pytest.raises(WsisegError) as error:
        validate_config(raw, check_files=False)
    message = str(error.value)
    assert "dataset.num_classes must be an integer" in message
    assert "training.epochs is 0; it must be at least 1" in message
    assert "training.augmentations.hflip is a probability" in message
    assert "system.precision is 'fp8'" in message


def test_unknown_model_name_is_suggested() -> None:
    raw = {"dataset": {"json": "x.json", "num_classes": 2}, "model": {"name": "uni_v11"}}
    with pytest.raises(WsisegError, match="uni_v1"):
        validate_config(raw, check_files=False)


def test_shipped_configs_are_valid(samples: dict[str, Path]) -> None:
    folder = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(folder.glob("*.yaml")):
        config = load_config(path, check_files=False)
        assert config["model"]["name"], path
    reference = load_config(folder / "reference" / "lunit_vits8.yaml")
    assert reference["model"]["lora_alpha"] == 4.0 and reference["validation"]["mode"] == "resize"
    demo = load_config(folder / "demo.yaml")
    assert Path(demo["dataset"]["json"]).is_file()
    assert demo["dataset"]["num_classes"] == 4


def test_typed_sections_hold_the_defaults_and_round_trip(samples: dict[str, Path]) -> None:
    from wsiseg.config import SCHEMA, defaults
    from wsiseg.config_types import SECTIONS, Config

    for name, section in SECTIONS.items():
        required = [key for key, spec in SCHEMA[name].items() if spec.default is REQUIRED]
        given = {key: "x" for key in required}
        assert vars(section(**given)) == {**defaults(name), **given}, name
    assert SCHEMA["training"]["lr"].types == (float, int) and SCHEMA["dataset"]["num_classes"].nullable
    assert SCHEMA["model"]["finetune_mode"].choices == ("lora", "dora", "full", "frozen")
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    typed = Config.from_dict(config)
    assert typed.training.loss["dice"] == 1.0 and typed.model.finetune_mode == "full"
    assert typed.to_dict() == config
