"""Inputs as users bring them: patch-sized crops, `--tissue`, tile stores as inputs, fast user errors."""

from __future__ import annotations

import os
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from tests.conftest import assert_user_error
from wsiseg.engine.segment import segment_slide
from wsiseg.errors import WsisegError

CLASSES = ["background", "tumour", "stroma"]
SIDES = (224, 256, 288, 512)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One torch thread (and one in subprocesses): two threads thrash on the shared 2-core machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def material(samples: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ViT checkpoint trained for 0.5 MPP and 64 px windows, and all-tissue crops of the real H&E image."""
    from wsiseg.models.checkpoint import save_checkpoint
    from wsiseg.models.segmenter import build_segmenter

    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    config = {
        "dataset": {"json": "unused.json", "num_classes": 3, "class_names": CLASSES, "mpp": 0.5, "ignore_index": 255},
        "model": {"name": "timm:test_vit", "finetune_mode": "full", "input_size": 64},
        "system": {"precision": "fp32"},
    }
    model = build_segmenter(config["model"], 3).eval()
    image = np.asarray(Image.open(samples["hgsc_image"]).convert("RGB"))
    standardise_last_layer(model, image[600:728, 600:728])
    save_checkpoint(root / "tiny.pth", model, config, CLASSES)
    paths = {"root": root, "checkpoint": root / "tiny.pth"}
    for side in SIDES:
        paths[f"crop{side}"] = root / f"crop{side}.png"
        Image.fromarray(image[600 : 600 + side, 600 : 600 + side]).save(paths[f"crop{side}"])
    return paths


def standardise_last_layer(model: torch.nn.Module, rgb: np.ndarray) -> None:
    """Scale the decoder's last convolution so each class's logit has mean 0 and std 1 on `rgb` (64 px windows).

    A random decoder predicts one class everywhere, which would make comparing labels trivial; this
    one gives all three classes in patterns that follow the image.
    """
    last = [module for module in model.decoder.modules() if isinstance(module, torch.nn.Conv2d)][-1]
    seen: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda module, inputs, output: seen.append(output))
    batch = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        for y in range(0, rgb.shape[0], 64):
            model(batch[..., y : y + 64, :64])
        logits = torch.cat([output.flatten(2) for output in seen], 2)[0]
        mean, std = logits.mean(1), logits.std(1)
        last.weight.div_(std[:, None, None, None])
        last.bias.sub_(mean).div_(std)
    hook.remove()


@pytest.mark.slow
def test_patches_segment_with_the_labels_infer_gives(material: dict[str, Path]) -> None:
    """Patch-sized images (the trainer's own input) through `segment` and through `infer`: same labels."""
    from wsiseg.train.infer import infer_images

    root = material["root"]
    document = {"train": [], "val": [], "test": [{"image_path": f"crop{side}.png"} for side in SIDES]}
    (root / "crops.json").write_text(json.dumps(document))
    infer_images(None, material["checkpoint"], root / "crops.json", root / "infer", device="cpu")
    for side in SIDES:
        summary = segment_slide(material[f"crop{side}"], material["checkpoint"], root / f"seg{side}", slide_mpp=0.5,
                                device="cpu", workers=0, batch_size=8, exports=(), show_progress=False)
        assert summary["tissue_fraction"] > 0.98 and summary["windows_tissue"] == summary["windows_total"]
        labels = np.asarray(zarr.open_group(str(root / f"seg{side}" / "mask.zarr"), mode="r")["0"][:])
        assert labels.shape == (side, side)
        inferred = np.asarray(Image.open(root / "infer" / "predictions_masks" / f"crop{side}.png"))
        assert (np.bincount(labels.ravel(), minlength=3) > 0.05 * labels.size).all()  # all classes occur
        assert (labels == inferred).mean() > 0.999, side


@pytest.mark.parametrize("side", [224, 512])
def test_fseg_on_a_patch_keeps_it_all(material: dict[str, Path], side: int) -> None:
    import wsiseg

    out = material["root"] / f"fseg{side}"
    summary = wsiseg.fseg_slide(material[f"crop{side}"], out, k=4, slide_mpp=0.5, window=256, device="cpu",
                                exports=())[0]
    labels = np.asarray(zarr.open_group(str(out / "mask.zarr"), mode="r")["0"][:])
    assert labels.shape == (side, side) and summary["tissue_fraction"] > 0.98
    assert (labels == 0).mean() < 0.02  # background is label 0


def test_tissue_all_and_a_mask_file(material: dict[str, Path], samples: dict[str, Path], tmp_path: Path) -> None:
    white = np.asarray(Image.open(material["crop256"])).copy()
    white[:, 128:] = 255  # right half glass
    Image.fromarray(white).save(tmp_path / "half.png")
    options = {"slide_mpp": 0.5, "device": "cpu", "workers": 0, "exports": (), "show_progress": False}
    auto = segment_slide(tmp_path / "half.png", material["checkpoint"], tmp_path / "auto", **options)
    everything = segment_slide(tmp_path / "half.png", material["checkpoint"], tmp_path / "all", tissue="all", **options)
    assert 0.4 < auto["tissue_fraction"] < 0.6 and everything["tissue_fraction"] == 1.0
    mask = np.zeros((256, 256), np.uint8)
    mask[:64] = 255
    Image.fromarray(mask).save(tmp_path / "top.png")
    top = segment_slide(tmp_path / "half.png", material["checkpoint"], tmp_path / "top", tissue=tmp_path / "top.png",
                        **options)
    labels = np.asarray(zarr.open_group(str(tmp_path / "top" / "mask.zarr"), mode="r")["0"][:])
    assert top["tissue_fraction"] == pytest.approx(0.25) and (labels[64:] == 0).all()
    mask[:128] = 255  # the user edits the mask file: the finished run no longer answers the request
    Image.fromarray(mask).save(tmp_path / "top.png")
    os.utime(tmp_path / "top.png", ns=(1, 1))
    with pytest.raises(WsisegError, match="finished run with other settings.*--overwrite"):
        segment_slide(tmp_path / "half.png", material["checkpoint"], tmp_path / "top", tissue=tmp_path / "top.png",
                      **options)
    edited = segment_slide(tmp_path / "half.png", material["checkpoint"], tmp_path / "top", tissue=tmp_path / "top.png",
                           overwrite=True, **options)
    assert edited["tissue_fraction"] == pytest.approx(0.5) and not edited.get("reused")
    Image.fromarray(np.full((256, 256, 3), 250, np.uint8)).save(tmp_path / "glass.png")
    with pytest.raises(WsisegError, match="no tissue found in glass.png .*--tissue all"):
        segment_slide(tmp_path / "glass.png", material["checkpoint"], tmp_path / "glass", **options)


@pytest.mark.slow
def test_a_store_run_gives_the_overlay_of_the_slide_run(material: dict[str, Path], samples: dict[str, Path],
                                                         tmp_path: Path) -> None:
    from wsiseg.store.tiling import tile_slide

    slide = tmp_path / "cmu.svs"
    shutil.copy(samples["cmu_svs"], slide)
    store = tile_slide(slide, tmp_path / "cmu.zarr", 4.0, tile=128, workers=0, progress=False)
    options = {"mpp": 4.0, "device": "cpu", "workers": 0, "exports": ("png",), "show_progress": False}
    segment_slide(slide, material["checkpoint"], tmp_path / "slide", **options)
    segment_slide(store.path, material["checkpoint"], tmp_path / "store", **options)
    from_slide = np.asarray(Image.open(tmp_path / "slide" / "overlay.png"))
    from_store = np.asarray(Image.open(tmp_path / "store" / "overlay.png"))
    assert np.array_equal(from_slide, from_store)
    slide.unlink()  # the store alone: its own pixels, white where no tile was stored
    segment_slide(store.path, material["checkpoint"], tmp_path / "alone", **options)
    alone = np.asarray(Image.open(tmp_path / "alone" / "overlay.png"))
    assert alone.shape == from_slide.shape
    assert np.abs(alone.astype(int) - from_slide).mean() < 3 and (alone == 255).all(axis=2).mean() > 0.3


ERRORS_WITHOUT_TORCH = """
import sys
from wsiseg.cli import main
try:
    main(sys.argv[1:])
finally:
    print("torch loaded" if "torch" in sys.modules else "torch not loaded")
"""


@pytest.mark.slow
def test_user_errors_arrive_in_one_line_before_torch_loads(material: dict[str, Path], tmp_path: Path) -> None:
    """Paths, MPP, options, weights: refused before torch or a model is loaded (so within about 0.6 s)."""
    checkpoint, crop = material["checkpoint"], material["crop224"]
    cases = [
        (("segment", tmp_path / "missing.svs", "--checkpoint", checkpoint, "--out", tmp_path / "a"), ("missing.svs",)),
        (("segment", crop, "--checkpoint", checkpoint, "--out", tmp_path / "b"), ("--slide-mpp",)),
        (("segment", crop, "--slide-mpp", "0.5", "--checkpoint", tmp_path / "none.pth", "--out", tmp_path / "c"),
         ("checkpoint",)),
        (("segment", crop, "--slide-mpp", "0.5", "--checkpoint", checkpoint, "--out", tmp_path / "d",
          "--tissue", "some"), ("--tissue",)),
        (("segment", crop, "--slide-mpp", "0.5", "--checkpoint", checkpoint, "--out", tmp_path / "e",
          "--overlap", "1.5"), ("--overlap",)),
        (("fseg", crop, "--slide-mpp", "0.5", "--model", "uni_v1", "--out", tmp_path / "f"), ("--weights",)),
        (("fseg", tmp_path / "missing.png", "--out", tmp_path / "g"), ("missing.png",)),
        (("fseg-fit", crop, "--slide-mpp", "0.5", "--model", "phikon", "--out", tmp_path / "h.safetensors"),
         ("--weights",)),
        (("tile", crop, "--mpp", "0.5", "--out", tmp_path / "i", "--tissue", tmp_path / "none.geojson"),
         ("none.geojson",)),
    ]
    for args, words in cases:
        result = subprocess.run([sys.executable, "-c", ERRORS_WITHOUT_TORCH, *map(str, args)], capture_output=True,
                                text=True, timeout=300)
        assert_user_error(result, *words)
        assert result.stdout.strip().endswith("torch not loaded"), (args, result.stdout)


@pytest.mark.slow
def test_a_store_at_another_mpp_than_asked_is_refused_before_torch_loads(material: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    from wsiseg.store.tiling import tile_slide

    store = tile_slide(material["crop224"], tmp_path / "crop.zarr", 0.5, slide_mpp=0.5, tissue="all", workers=0,
                       progress=False)
    args = ("segment", store.path, "--checkpoint", material["checkpoint"], "--out", tmp_path / "out", "--mpp", "1")
    result = subprocess.run([sys.executable, "-c", ERRORS_WITHOUT_TORCH, *map(str, args)], capture_output=True,
                            text=True, timeout=300)
    assert_user_error(result, "holds the slide at 0.5 MPP, not 1", "--mpp 0.5")
    assert result.stdout.strip().endswith("torch not loaded"), result.stdout


def test_a_tissue_mask_file_that_marks_nothing_in_the_image_is_named(material: dict[str, Path], tmp_path: Path) -> None:
    """The advice is not "pass a mask file" when a mask file was passed: it names the file and what to check."""
    outside = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[1000, 1000], [1100, 1000], [1100, 1100], [1000, 1100], [1000, 1000]]]}}]}
    mask = tmp_path / "elsewhere.geojson"
    mask.write_text(json.dumps(outside))
    with pytest.raises(WsisegError, match="the --tissue mask elsewhere.geojson marks no tissue in crop224.png .*covers"):
        segment_slide(material["crop224"], material["checkpoint"], tmp_path / "out", tissue=mask, slide_mpp=0.5,
                      device="cpu", workers=0, exports=(), show_progress=False)
    assert not (tmp_path / "out" / "mask.zarr").exists()
