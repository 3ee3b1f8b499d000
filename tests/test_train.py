"""The training loop on real tiles: output tree, exact resume, refusals, and CLI user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import assert_user_error, run_cli
from tests.train_fixtures import make_config, make_dataset, train_tiny
from wsiseg.errors import WsisegError
from wsiseg.models.checkpoint import load_segmenter, read_checkpoint
from wsiseg.train import trainer as trainer_module
from wsiseg.train.trainer import train_model

pytestmark = pytest.mark.slow  # end to end: trains, or runs the CLI in subprocesses


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, samples: dict[str, Path]) -> dict:
    return train_tiny(tmp_path_factory.mktemp("full"), samples, epochs=2)


def test_output_tree(uninterrupted: dict) -> None:
    out = Path(uninterrupted["output_dir"])
    for name in ("config.yaml", "training.log", "metrics.jsonl", "training_history.png",
                 "checkpoints/last.pth", "checkpoints/best_model.pth"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "visualizations").iterdir()) == ["epoch001_val_0.png", "epoch002_val_0.png"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert set(lines[-1]["val"]) >= {"mdice", "dice_no_bg", "miou", "kappa", "per_class", "confusion_matrix"}
    assert lines[-1]["train_images_per_s"] > 0
    log = (out / "training.log").read_text()
    assert "epoch 2/2 loss" in log and "val mdice" in log
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["training"]["epochs"] == 2 and saved["dataset"]["num_classes"] == 4
    best = read_checkpoint(out / "checkpoints" / "best_model.pth")
    assert best["extra"]["metric"] == "mdice"
    assert best["extra"]["value"] == pytest.approx(max(line["val"]["mdice"] for line in lines))
    model = load_segmenter(None, out / "checkpoints" / "best_model.pth")
    assert model.num_classes == 4 and model.class_names[3] == "neoplastic"


def test_interrupted_then_resumed_run_ends_identical(tmp_path: Path, samples: dict[str, Path], uninterrupted: dict,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    original = trainer_module.Trainer.train_one_epoch

    def crash_in_second_epoch(self, epoch: int):  # type: ignore[no-untyped-def]
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(trainer_module.Trainer, "train_one_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tmp_path, samples, epochs=2)
    monkeypatch.setattr(trainer_module.Trainer, "train_one_epoch", original)
    last = tmp_path / "run" / "checkpoints" / "last.pth"
    assert read_checkpoint(last)["extra"]["epoch"] == 1
    resumed = train_model(tmp_path / "config.yaml", resume=last)
    assert resumed["epochs"] == 2
    full, again = uninterrupted["last"], resumed["last"]
    assert again["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
    assert again["val"]["confusion_matrix"] == full["val"]["confusion_matrix"]
    a = read_checkpoint(Path(uninterrupted["output_dir"]) / "checkpoints" / "last.pth")
    b = read_checkpoint(last)
    for key, tensor in a["decoder"].items():
        torch.testing.assert_close(b["decoder"][key], tensor, rtol=1e-5, atol=1e-6)
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]


def test_existing_run_is_not_overwritten(uninterrupted: dict) -> None:
    with pytest.raises(WsisegError, match="already holds a run: pass --resume"):
        train_model(uninterrupted["config"])


def test_run_stopped_before_its_first_checkpoint_starts_over(tmp_path: Path, samples: dict[str, Path]) -> None:
    json_path = make_dataset(tmp_path / "data", samples)
    config = make_config(tmp_path, json_path, training={"epochs": 1})
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("left by a run that failed\n")
    (out / "training.log").write_text("failed before its first checkpoint\n")
    summary = train_model(config)
    assert summary["epochs"] == 1
    assert (out / "checkpoints" / "last.pth").is_file()
    assert "failed before" not in (out / "training.log").read_text()


def test_a_run_failing_at_its_first_last_pth_is_started_over_by_a_plain_rerun(
        tmp_path: Path, samples: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk (or a kill) between the first best_model.pth and the first last.pth leaves nothing to resume:
    the plain rerun, which the failure's advice names, starts the run over instead of refusing it."""
    import errno

    from wsiseg.train import trainer as trainer_module

    json_path = make_dataset(tmp_path / "data", samples)
    config = make_config(tmp_path, json_path, training={"epochs": 1})

    def disk_full(self: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "save_last", disk_full)
        with pytest.raises(OSError):
            train_model(config)
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best_model.pth"]
    (out / "checkpoints" / ".last.999999.1.partial.pth").write_bytes(b"half a checkpoint, of a killed save")
    summary = train_model(config)
    assert summary["epochs"] == 1 and (out / "checkpoints" / "last.pth").is_file()


def test_foreign_files_without_a_checkpoint_are_refused_with_true_advice(tmp_path: Path,
                                                                         samples: dict[str, Path]) -> None:
    json_path = make_dataset(tmp_path / "data", samples)
    config = make_config(tmp_path, json_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    with pytest.raises(WsisegError, match="holds no run to resume .*last.pth is missing.*--overwrite") as error:
        train_model(config)
    assert "--resume" not in str(error.value)
    assert (out / "notes.txt").read_text() == "the user's own file\n"


def test_resume_refuses_another_class_count(tmp_path: Path, samples: dict[str, Path], uninterrupted: dict) -> None:
    json_path = make_dataset(tmp_path / "data", samples)
    config = make_config(tmp_path, json_path, dataset={"num_classes": 5, "class_names": None})
    with pytest.raises(WsisegError, match="dataset.num_classes = 4 but the config has 5"):
        train_model(config, resume=Path(uninterrupted["output_dir"]) / "checkpoints" / "last.pth")
    assert not (tmp_path / "run").exists()  # refused before the run's output folder is made


def test_unreadable_training_image_is_named(tmp_path: Path, samples: dict[str, Path]) -> None:
    json_path = make_dataset(tmp_path / "data", samples)
    (tmp_path / "data" / "images" / "train_1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(WsisegError, match=r"cannot read image .*train_1.png"):
        train_model(make_config(tmp_path, json_path))


def test_cli_user_errors(tmp_path: Path, samples: dict[str, Path]) -> None:
    json_path = make_dataset(tmp_path / "data", samples)
    config = make_config(tmp_path, json_path)
    raw = yaml.safe_load(config.read_text())
    raw["training"]["ephocs"] = 3
    config.write_text(yaml.safe_dump(raw))
    assert_user_error(run_cli("train", config), "training.ephocs", "did you mean 'epochs'")
    raw["training"].pop("ephocs")
    config.write_text(yaml.safe_dump(raw))
    document = json.loads(json_path.read_text())
    document["train"] = []
    json_path.write_text(json.dumps(document))
    with pytest.raises(WsisegError, match="split 'train' .* is empty"):
        train_model(config)


def test_last_accumulation_group_of_an_epoch_is_averaged_over_its_own_size():
    from wsiseg.train.trainer import accumulation_group

    sizes = [accumulation_group(index, 7, 3) for index in range(7)]
    assert sizes == [3, 3, 3, 3, 3, 3, 1]
    assert [accumulation_group(index, 4, 1) for index in range(4)] == [1, 1, 1, 1]
    assert [accumulation_group(index, 4, 8) for index in range(4)] == [4, 4, 4, 4]
