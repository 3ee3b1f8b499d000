"""A reference user's files, unchanged: their config, dataset JSON and commands train and infer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import assert_user_error, run_cli
from tests.train_fixtures import make_reference_dataset, random_lunit_weights, reference_config, train_tiny
from wsiseg.engine.image import ImageInference
from wsiseg.train.infer import infer_images

pytestmark = pytest.mark.slow  # end to end: trains, or runs the CLI in subprocesses


def run_here(capsys: pytest.CaptureFixture, *args: object) -> subprocess.CompletedProcess:
    """`wsiseg ARGS` in this process (cheaper than a subprocess for commands that import no torch)."""
    from wsiseg.cli import main

    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, samples: dict[str, Path]) -> dict[str, Path]:
    """`wsiseg train --config` on the reference example config (lunit_vits8, LoRA r4 a1, SGD nesterov,
    cosine warmup, dice, use_amp on CPU) and a reference-layout JSON with one test item lacking a mask."""
    root = tmp_path_factory.mktemp("reference")
    json_path = make_reference_dataset(root / "data", samples)
    weights = random_lunit_weights(root / "lunit_vits8.pth")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(reference_config(json_path, weights, root / "logs")))
    result = run_cli("train", "--config", config, "--device", "cpu", "--options", "training.epochs=1",
                     "system.seed=3", cwd=root)
    assert result.returncode == 0, result.stderr
    return {"root": root, "config": config, "json": json_path, "run": root / "logs" / "pfm_segmentation"}


def test_reference_output_tree_and_log(reference_run: dict[str, Path]) -> None:
    run = reference_run["run"]
    for name in ("config.yaml", "training.log", "checkpoints/best_model.pth", "training_history.png"):
        assert (run / name).is_file(), name
    assert [p.name for p in (run / "visualizations").iterdir()] == ["epoch001_val_0.png"]
    log = (run / "training.log").read_text()
    assert log.count("reference config keys read as:") == 1
    assert "model.finetune_mode.alpha 1.0 -> model.lora_alpha 4.0" in log
    assert "system.seed" not in log.split("reference config keys read as:")[1].splitlines()[0]
    assert "rank 4, alpha 4.0 (scale alpha/r = 1)" in log
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["name"] == "lunit_vits8" and saved["system"]["seed"] == 3
    assert saved["training"]["nesterov"] is True and saved["training"]["loss"] == {
        **saved["training"]["loss"], "dice": 1.0}


def test_infer_with_the_reference_flags(reference_run: dict[str, Path]) -> None:
    root, run = reference_run["root"], reference_run["run"]
    out = root / "results"
    result = run_cli("infer", "--config", reference_run["config"], "--checkpoint", run / "checkpoints" / "best_model.pth",
                     "--input_json", reference_run["json"], "--output_dir", out, "--device", "cpu",
                     "--input_size", "64", "--resize_or_windowslide", "windowslide", "--batch_size", "2", cwd=root)
    assert result.returncode == 0, result.stderr
    masks = sorted(p.name for p in (out / "predictions_masks").iterdir())
    assert masks == ["test_0.png", "test_1.png"]  # test_1 has no mask_path: predicted all the same
    assert sorted(p.name for p in (out / "predictions_overlays").iterdir()) == masks
    for name in masks:
        with Image.open(out / "predictions_masks" / name) as mask, Image.open(root / "data" / "images" / name) as image:
            assert mask.size == image.size and np.asarray(mask).max() < 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 1 and [item["image"] for item in metrics["per_image"]] == ["test_0"]
    again = infer_images(None, run, reference_run["json"], root / "again", ImageInference(mode="resize"), device="cpu")
    assert again["images"] == 2 and again["with_masks"] == 1  # a run folder as the checkpoint, no config


def test_unsupported_reference_mode_is_one_clear_error(reference_run: dict[str, Path],
                                                       capsys: pytest.CaptureFixture) -> None:
    raw = yaml.safe_load(reference_run["config"].read_text())
    raw["model"]["finetune_mode"]["type"] = "cnn_adapter"
    path = reference_run["root"] / "adapter.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert_user_error(run_here(capsys, "train", "--config", path), "cnn_adapter", "not implemented", "use lora, dora")
    assert_user_error(run_here(capsys, "train", path, path), "give one config")
    assert_user_error(run_here(capsys, "train", path, "training.epochs=2"), "put --options before it")
    assert_user_error(run_here(capsys, "config", "migrate", path), "cnn_adapter")


def test_migrate_command(reference_run: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    out = reference_run["root"] / "native.yaml"
    result = run_here(capsys, "config", "migrate", reference_run["config"], "--out", out)
    assert result.returncode == 0, result.stderr
    native = yaml.safe_load(out.read_text())
    assert native["model"]["name"] == "lunit_vits8" and native["model"]["lora_alpha"] == 4.0
    printed = run_here(capsys, "config", "migrate", reference_run["config"])
    assert yaml.safe_load(printed.stdout) == native


def test_eval_and_save_intervals_drive_the_run(tmp_path: Path, samples: dict[str, Path]) -> None:
    summary = train_tiny(tmp_path, samples, epochs=3, validation={"eval_interval": 2},
                         visualization={"save_interval": 2})
    out = Path(summary["output_dir"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("val" in line) for line in lines] == [False, True, True]  # every 2nd epoch, and the last
    assert sorted(p.name for p in (out / "visualizations").iterdir()) == ["epoch002_val_0.png", "epoch003_val_0.png"]


def test_resume_from_the_run_folder(tmp_path: Path, samples: dict[str, Path]) -> None:
    from wsiseg.train.trainer import train_model

    first = train_tiny(tmp_path, samples, epochs=1)
    resumed = train_model(first["config"], resume=first["output_dir"], options=["training.epochs=2"])
    assert resumed["epochs"] == 2
    lines = (Path(first["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
