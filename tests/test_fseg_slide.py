"""F-Seg on real slides with the real pretrained EfficientNet-Lite0: outputs, consistency, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import wsiseg
from tests.conftest import assert_user_error, run_cli
from wsiseg.errors import WsisegError
from wsiseg.fseg.concepts import load_bank

HGSC_MPP = 0.25  # the HGSC JPEGs are 40x crops
SMALL = {"mpp": 0.5, "window": 256, "device": "cpu"}


@pytest.fixture(scope="module")
def halves(samples: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The HGSC image cut into a left and a right 'slide', its nuclei-type map, and a bank fitted on the left."""
    folder = tmp_path_factory.mktemp("halves")
    image = np.asarray(Image.open(samples["hgsc_image"]).convert("RGB"))
    types = np.asarray(Image.open(samples["hgsc_mask"]))
    Image.fromarray(image[:, :750]).save(folder / "left.png")
    Image.fromarray(image[:, 750:]).save(folder / "right.png")
    Image.fromarray(image[:, 200:950]).save(folder / "shifted.png")
    bank = folder / "left_bank.safetensors"
    wsiseg.fit_concepts(folder / "left.png", bank, ks=[4, 8], slide_mpp=HGSC_MPP, **SMALL)
    return {"folder": folder, "bank": bank, "types": types, "image": image}


def labels_of(slide: Path, bank: Path, out: Path, k: int) -> np.ndarray:
    """The label image of `slide` segmented with `bank` (each slide is segmented once per module)."""
    if not (out / "mask.tif").exists():
        wsiseg.fseg_slide(slide, out, k=k, bank=bank, slide_mpp=HGSC_MPP, device="cpu", exports=("tiff",))
    return tifffile.imread(out / "mask.tif")


def test_fit_concepts_writes_a_bank_for_every_k(halves: dict) -> None:
    bank = load_bank(halves["bank"])
    assert bank.ks == [4, 8]
    assert (bank.model, bank.layer, bank.mpp, bank.window, bank.feature_dim) == ("efficientnet_lite0_imagenet", "4", 0.5, 256, 320)
    for k in bank.ks:
        assert (bank.get(k) >= 0).all() and np.linalg.matrix_rank(bank.get(k)) == k


def test_same_tissue_gets_the_same_concepts_in_two_slides(halves: dict) -> None:
    """A strip shifted by 100 px (not a multiple of the 32 px token or of the window stride), as its
    own slide, gets the same concepts as the same pixels of the left half, away from the slide edges."""
    folder = halves["folder"]
    left = labels_of(folder / "left.png", halves["bank"], folder / "seg_left", 8)
    shifted = labels_of(folder / "shifted.png", halves["bank"], folder / "seg_shifted", 8)
    # at 0.5 MPP the shifted slide's column 0 is the left half's column 100; compare the common part
    # without a 32 px (one token) margin at either slide's edges, where the CNN sees padding
    common_left, common_shifted = left[32:-32, 132:343], shifted[32:-32, 32:243]
    agreement = (common_left == common_shifted).mean()
    assert agreement > 0.8, agreement  # measured 0.91
    assert len(np.unique(common_left)) >= 3


def test_bank_from_one_slide_labels_another_consistently(halves: dict) -> None:
    """Concepts mean the same nuclei types on both halves: a concept -> type map learnt on the left
    half predicts the nuclei types of the right half nearly as well as one learnt on the right."""
    folder, types = halves["folder"], halves["types"]
    left = labels_of(folder / "left.png", halves["bank"], folder / "seg_left", 8)
    right = labels_of(folder / "right.png", halves["bank"], folder / "seg_right", 8)

    def at(labels: np.ndarray, part: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(part).resize(labels.shape[::-1], Image.Resampling.NEAREST))

    truth_left, truth_right = at(left, types[:, :750]), at(right, types[:, 750:])

    def type_of_concept(labels: np.ndarray, truth: np.ndarray) -> np.ndarray:
        counts = np.zeros((9, 4))
        nuclei = truth > 0
        np.add.at(counts, (labels[nuclei], truth[nuclei]), 1)
        return counts[:, 1:].argmax(axis=1) + 1

    nuclei = truth_right > 0
    transfer = (type_of_concept(left, truth_left)[right[nuclei]] == truth_right[nuclei]).mean()
    oracle = (type_of_concept(right, truth_right)[right[nuclei]] == truth_right[nuclei]).mean()
    baseline = np.bincount(truth_right[nuclei]).max() / nuclei.sum()
    assert transfer > baseline + 0.05, (transfer, baseline)
    assert transfer > 0.85 * oracle, (transfer, oracle)


@pytest.mark.slow
def test_fseg_on_the_sample_slide_writes_every_output(samples: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmu"
    # unclipped, so that glass inside tissue windows keeps its concept (checked below)
    summary = wsiseg.fseg_slide(samples["cmu_svs"], out, k=6, mpp=2.0, window=256, device="cpu",
                                clip_to_tissue=False)[0]
    for name in ("mask.zarr", "mask.tif", "mask.ome.tif", "overlay.png", "summary.json", "concepts.safetensors"):
        assert (out / name).exists(), name
    names = ["background"] + [f"concept {i}" for i in range(6)]
    assert summary["classes"] == names
    assert json.loads((out / "summary.json").read_text())["model"]["k"] == 6
    assert set(summary["class_area_mm2"]) == set(names)
    assert load_bank(out / "concepts.safetensors").ks == [6]
    labels = tifffile.imread(out / "mask.tif")
    assert labels.max() <= 6 and len(np.unique(labels[labels > 0])) >= 4
    # the concept that dominates bright glass is rare on stained tissue: background is its own concept
    with wsiseg.open_slide(samples["cmu_svs"]) as slide:
        rgb = slide.read(0, 0, labels.shape[1], labels.shape[0], 2.0)
    brightness = rgb.mean(axis=2)
    processed = labels > 0
    glass_concept = np.bincount(labels[processed & (brightness > 235)]).argmax()
    stained = processed & (brightness < 180)
    assert (labels[stained] == glass_concept).mean() < 0.1
    # refusing to overwrite, then overwriting
    with pytest.raises(WsisegError, match="already exists"):
        wsiseg.fseg_slide(samples["cmu_svs"], out, k=6, mpp=2.0, window=256, device="cpu")


def test_bad_input(halves: dict, tmp_path: Path) -> None:
    folder = halves["folder"]
    with pytest.raises(WsisegError, match="no k=5.*k = 4, 8"):
        wsiseg.fseg_slide(folder / "left.png", tmp_path / "a", k=5, bank=halves["bank"], slide_mpp=HGSC_MPP)
    with pytest.raises(WsisegError, match="fitted with model efficientnet_lite0_imagenet, not timm:resnet18"):
        wsiseg.fseg_slide(folder / "left.png", tmp_path / "b", k=4, bank=halves["bank"], model="timm:resnet18",
                          layer=-1, slide_mpp=HGSC_MPP, device="cpu")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((600, 600, 3), 255, np.uint8)).save(blank)
    with pytest.raises(WsisegError, match="no tissue"):
        wsiseg.fseg_slide(blank, tmp_path / "c", k=4, bank=halves["bank"], slide_mpp=0.5, device="cpu")
    with pytest.raises(WsisegError, match="larger than the .* distinct token features"):
        wsiseg.fit_concepts(folder / "left.png", None, ks=[300], slide_mpp=HGSC_MPP, max_windows=1, **SMALL)
    with pytest.raises(WsisegError, match="not a multiple of 32"):
        wsiseg.fit_concepts(folder / "left.png", None, ks=[4], slide_mpp=HGSC_MPP, mpp=0.5, window=200, device="cpu")


@pytest.mark.slow
def test_cli_user_errors(halves: dict, tmp_path: Path) -> None:
    data = Path(__file__).parent / "data"
    result = run_cli("fseg", halves["folder"] / "left.png", "--slide-mpp", HGSC_MPP, "--k", 3,
                     "--bank", data / "fseg_bank_joblib.pkl", "--out", tmp_path / "x", "--device", "cpu")
    assert_user_error(result, "12-long concepts", "320-long features")


def test_fseg_slides_skip_a_bad_slide_and_rerun_skips_the_finished(samples: dict[str, Path], tmp_path: Path) -> None:
    from wsiseg.fseg.slides import fseg_slides

    slides = [samples["cmu_svs"], samples["unreadable_svs"]]
    options = {"k": 2, "mpp": 4.0, "window": 64, "device": "cpu", "exports": ("tiff",), "show_progress": False}
    with pytest.raises(WsisegError, match="corrupt"):
        fseg_slides(slides, tmp_path / "stop", **options)
    results = fseg_slides(slides, tmp_path / "out", skip_errors=True, **options)
    assert [r.status for r in results] == ["done", "failed"] and "corrupt" in results[1].message
    assert load_bank(tmp_path / "out" / "concepts.safetensors").extra["request"]["slides"] == [
        str(samples["cmu_svs"].resolve())]  # fitted on the slide that opens
    again = fseg_slides(slides[:1], tmp_path / "out" / "cmu_svs", bank=tmp_path / "out" / "concepts.safetensors",
                        **options)
    assert again[0].status == "skipped"


def test_a_multi_slide_run_loads_its_model_once(samples: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import wsiseg.model_cache
    import wsiseg.models.registry
    from wsiseg.fseg.slides import fseg_slides

    loads: list[str] = []
    real = wsiseg.models.registry.build_backbone
    monkeypatch.setattr(wsiseg.models.registry, "build_backbone", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(wsiseg.model_cache, "_LAST", {})
    slides = [samples["cmu_svs"], samples["cmu_pyramid_tiff"]]
    options = {"k": 2, "mpp": 4.0, "window": 64, "device": "cpu", "exports": (), "show_progress": False}
    results = fseg_slides(slides, tmp_path / "out", **options)  # the shared fit, then both slides
    assert [r.status for r in results] == ["done", "done"] and len(loads) == 1
    assert [r.status for r in fseg_slides(slides, tmp_path / "out", **options)] == ["skipped", "skipped"]
    assert len(loads) == 1
    fseg_slides(slides[:1], tmp_path / "layer", layer=-2, **options)
    assert len(loads) == 1  # another layer of the same backbone
