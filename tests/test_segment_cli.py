"""`wsiseg segment`, `export` and `eval` as a user runs them; bad inputs give one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import assert_user_error, run_cli

CLASSES = ["background", "tumour", "stroma"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One torch thread in the subprocesses: two threads thrash on the shared 2-core machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def material(samples: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny checkpoint, its config, and a real H&E PNG (no MPP in the file)."""
    import torch

    from wsiseg.models.checkpoint import save_checkpoint
    from wsiseg.models.segmenter import build_segmenter

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    config = {
        "dataset": {"json": "unused.json", "num_classes": 3, "class_names": CLASSES, "mpp": 2.0},
        "model": {"name": "timm:test_vit", "finetune_mode": "full", "input_size": 64},
    }
    save_checkpoint(root / "tiny.pth", build_segmenter(config["model"], 3), config, CLASSES)
    wrong = {**config, "dataset": {**config["dataset"], "num_classes": 5, "class_names": list("abcde")}}
    (root / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    image = np.asarray(Image.open(samples["hgsc_image"]).convert("RGB"))[400:620, 300:500]
    Image.fromarray(image).save(root / "he.png")
    return {"root": root, "checkpoint": root / "tiny.pth", "wrong_config": root / "wrong.yaml", "png": root / "he.png"}


def test_segment_png_export_and_eval(material: dict[str, Path]) -> None:
    out = material["root"] / "seg"
    result = run_cli("segment", material["png"], "--slide-mpp", "2", "--checkpoint", material["checkpoint"],
                     "--out", out, "--workers", "0", "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout and "he.png" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["width"], summary["height"]) == (200, 220) and summary["mpp"] == 2.0
    for name in ("mask.zarr", "mask.tif", "mask.ome.tif", "overlay.png", "segment.log"):
        assert (out / name).exists(), name

    result = run_cli("export", out / "mask.zarr", "--format", "geojson")
    assert result.returncode == 0, result.stderr
    features = json.loads((out / "mask.geojson").read_text())["features"]
    assert features and {f["properties"]["classification"]["name"] for f in features} <= set(CLASSES[1:])

    result = run_cli("eval", out / "mask.zarr", "--annotations", out / "mask.geojson", "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["pixel_acc"] == 1.0  # the polygons of the mask itself, along its pixel edges

    coarse = out / "coarse.geojson"
    result = run_cli("export", out / "mask.zarr", "--format", "geojson", "--out", coarse, "--level", "1",
                     "--simplify", "4", "--min-area", "40")
    assert result.returncode == 0, result.stderr
    areas = [f["properties"]["measurements"]["Area µm^2"] for f in json.loads(coarse.read_text())["features"]]
    assert areas and min(areas) >= 40
    assert_user_error(run_cli("export", out / "mask.zarr", "--format", "geojson", "--out", out / "x.geojson",
                              "--level", "99"), "--level 99", "0..")

    assert_user_error(run_cli("export", out / "mask.zarr", "--format", "geojson"), "already exists", "--overwrite")
    same = run_cli("segment", material["png"], "--slide-mpp", "2", "--checkpoint", material["checkpoint"],
                   "--out", out, "--workers", "0")
    assert same.returncode == 0 and "skipped" in same.stdout, same.stderr
    assert_user_error(run_cli("segment", material["png"], "--slide-mpp", "2", "--checkpoint", material["checkpoint"],
                              "--out", out, "--workers", "0", "--overlap", "0.5"), "already exists", "--overwrite")


@pytest.mark.parametrize(
    "case",
    ["config mismatch", "no mpp", "window", "store mpp", "missing mask"],
)
def test_bad_inputs(case: str, material: dict[str, Path], tmp_path: Path) -> None:
    common = ["--checkpoint", material["checkpoint"], "--out", tmp_path / "out", "--workers", "0"]
    if case == "config mismatch":
        result = run_cli("segment", material["png"], "--slide-mpp", "2", "--config", material["wrong_config"], *common)
        assert_user_error(result, "5 classes", "3")
    elif case == "no mpp":
        assert_user_error(run_cli("segment", material["png"], *common), "mpp")
    elif case == "window":
        assert_user_error(run_cli("segment", material["png"], "--slide-mpp", "2", "--window", "70", *common),
                          "multiple", "16")
    elif case == "store mpp":
        from wsiseg.store.tiling import tile_slide

        store = tile_slide(material["png"], tmp_path / "he.zarr", 2.0, slide_mpp=2.0, tile=64, workers=0,
                           progress=False)
        assert_user_error(run_cli("segment", store.path, "--mpp", "4", *common), "MPP", "tile")
    else:
        assert_user_error(run_cli("eval", tmp_path / "nothing.zarr", "--annotations", tmp_path), "does not exist")
    assert not (tmp_path / "out" / "mask.zarr").exists()
