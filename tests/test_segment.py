"""`segment_slide` end to end on real samples with a tiny ViT segmenter: outputs, blend equality, resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import zarr
import pytest
import torch
from PIL import Image

from tests.blend_reference import blend_in_memory, finalise
from tests.real_cluster import real_cluster
from tests.train_fixtures import save_tiny_vit
from wsiseg.engine.blend import window_weights
from wsiseg.engine.loader import partition
from wsiseg.engine.image import predict_resized, to_tensor
from wsiseg.engine.predictors import BatchRunner, SegmenterPredictor
from wsiseg.engine.regions import tissue_regions
from wsiseg.engine.run import run_slide
from wsiseg.engine.segment import segment_slide, segment_slides
from wsiseg.errors import WsisegError
from wsiseg.slide import open_slide
from wsiseg.slide.grid import Grid
from wsiseg.slide.tissue import tissue_mask
from wsiseg.store.masks import MaskStore

CLASSES = ["background", "tumour", "stroma"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core machine, two threads thrash and run ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("model") / "tiny.pth", CLASSES, 4.0)


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> SegmenterPredictor:
    from wsiseg.engine.segment import load_predictor

    return load_predictor(checkpoint, device="cpu")[0]


@pytest.fixture(scope="module")
def he_png(samples: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300 x 260 crop of the real H&E image with white background on its right, as a plain PNG (no MPP)."""
    image = np.asarray(Image.open(samples["hgsc_image"]).convert("RGB"))[400:700, 300:560].copy()
    image[:, 150:] = 255
    path = tmp_path_factory.mktemp("png") / "he.png"
    Image.fromarray(image).save(path)
    return path


@pytest.mark.slow
def test_cmu_slide_end_to_end(samples: dict[str, Path], checkpoint: Path, tmp_path: Path) -> None:
    import openslide
    import tifffile

    from wsiseg.export.tiff import exact_level_shapes

    out = tmp_path / "cmu"
    summary = segment_slide(samples["cmu_svs"], checkpoint, out, mpp=2.0, workers=1, batch_size=16,
                            show_progress=False)
    with open_slide(samples["cmu_svs"]) as slide:
        width, height = slide.size_at(2.0)
    store = MaskStore.open(out / "mask.zarr")
    assert store.is_complete and store.level(0).shape == (height, width)
    with openslide.OpenSlide(str(out / "mask.tif")) as mask:
        # padded to exact halves, no level narrower than a 256 px tile
        shapes = exact_level_shapes(height, width, 256, store.num_levels)
        assert mask.level_dimensions == tuple((w, h) for h, w in shapes) and mask.level_count >= 2
        assert float(mask.properties["openslide.mpp-x"]) == pytest.approx(2.0)
        for level in range(mask.level_count):
            labels = store.level(level)[:]
            grey = np.asarray(mask.read_region((0, 0), level, labels.shape[::-1]))[..., 0]
            assert np.array_equal(grey, labels)  # min-is-black labels read back exactly at every level
    with tifffile.TiffFile(out / "mask.ome.tif") as tif:
        assert tif.is_ome and len(tif.series[0].levels) == len(shapes)
    assert Image.open(out / "overlay.png").size[1] >= min(height, 2048)
    written = json.loads((out / "summary.json").read_text())
    assert written["windows_run"] == written["windows_tissue"] == summary["windows_tissue"] > 0
    assert written["windows_tissue"] < written["windows_total"]  # background windows were skipped
    assert written["mpp"] == 2.0 and written["tiles_per_s"] > 0 and set(written["class_area_mm2"]) == set(CLASSES)
    total_area = sum(written["class_area_mm2"].values())
    assert total_area == pytest.approx(width * height * (2.0 / 1000) ** 2)
    assert not list(out.glob(".*partial"))
    stamp = (out / "mask.tif").stat().st_mtime_ns
    again = segment_slide(samples["cmu_svs"], checkpoint, out, mpp=2.0, show_progress=False)  # same settings
    assert again["reused"] and again["windows_tissue"] == written["windows_tissue"]
    assert (out / "mask.tif").stat().st_mtime_ns == stamp
    with pytest.raises(WsisegError, match="already exists.*other settings.*--overwrite"):
        segment_slide(samples["cmu_svs"], checkpoint, out, mpp=2.0, overlap=0.5, show_progress=False)


def test_windowslide_equals_in_memory_gaussian_blend(he_png: Path, predictor: SegmenterPredictor, tmp_path: Path) -> None:
    window, overlap, batch_size, mpp = 64, 0.25, 4, 2.0
    run_slide(he_png, predictor, tmp_path / "out", mpp=mpp, window=window, overlap=overlap, batch_size=batch_size,
              workers=0, slide_mpp=2.0, exports=(), save_probabilities=True, show_progress=False,
              clip_to_tissue=False)
    store = MaskStore.open(tmp_path / "out" / "mask.zarr")

    slide = open_slide(he_png, 2.0)
    image = slide.read(0, 0, *slide.size_at(mpp), mpp)
    positions = Grid.from_overlap(image.shape[1], image.shape[0], window, overlap).tissue_positions(
        tissue_mask(slide), mpp)
    assert 0 < len(positions) < len(Grid.from_overlap(image.shape[1], image.shape[0], window, overlap))
    padded = np.pad(image, ((0, window), (0, window), (0, 0)), constant_values=255)
    scores = []
    for batch in partition(len(positions), batch_size):
        pixels = np.stack([padded[y : y + window, x : x + window] for x, y in (positions[i] for i in batch)])
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        scores.extend(predictor.predict(tensor).numpy())
    total, weight_sum = blend_in_memory(scores, positions, image.shape[0], image.shape[1], window_weights(window))
    labels, probabilities = finalise(total, weight_sum, background=0)
    assert np.array_equal(store.level(0)[:], labels)
    assert np.array_equal(store.probabilities[:], probabilities.astype(np.float16))
    assert len(np.unique(labels)) > 1


def test_pixels_outside_tissue_are_background(he_png: Path, predictor: SegmenterPredictor, tmp_path: Path) -> None:
    options = dict(mpp=2.0, window=64, overlap=0.25, batch_size=4, workers=0, slide_mpp=2.0, exports=(),
                   show_progress=False)
    run_slide(he_png, predictor, tmp_path / "clipped", **options)
    run_slide(he_png, predictor, tmp_path / "unclipped", clip_to_tissue=False, **options)
    clipped = MaskStore.open(tmp_path / "clipped" / "mask.zarr").level(0)[:]
    unclipped = MaskStore.open(tmp_path / "unclipped" / "mask.zarr").level(0)[:]
    slide = open_slide(he_png, 2.0)
    inside = tissue_mask(slide).sample_rows(0, clipped.shape[0], clipped.shape[1], 2.0)
    assert 0 < inside.mean() < 1
    assert (clipped[~inside] == 0).all()
    assert (unclipped[~inside] != 0).any()  # the white half inside tissue windows got labels before clipping
    assert np.array_equal(clipped[inside], unclipped[inside])


class Crash(RuntimeError):
    pass


class CrashingPredictor:
    """The real predictor, but the process 'dies' after `batches` batches."""

    def __init__(self, inner: SegmenterPredictor, batches: int) -> None:
        self.inner, self.left = inner, batches
        self.num_outputs, self.class_names, self.colors = inner.num_outputs, inner.class_names, inner.colors
        self.input_multiple = inner.input_multiple

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        if self.left == 0:
            raise Crash("killed")
        self.left -= 1
        return self.inner.predict(batch)


def test_killed_run_resumes_to_identical_output(he_png: Path, predictor: SegmenterPredictor, tmp_path: Path) -> None:
    import tifffile

    options = dict(mpp=2.0, window=64, overlap=0.25, batch_size=4, workers=0, slide_mpp=2.0, chunk=64,
                   exports=("tiff",), save_probabilities=True, show_progress=False)
    reference = run_slide(he_png, predictor, tmp_path / "clean", **options)
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        run_slide(he_png, CrashingPredictor(predictor, 4), out, **options)
    assert not (out / "mask.zarr").exists() and not (out / "mask.tif").exists()
    partial = MaskStore.open(out / ".mask.zarr.partial")
    assert 0 < partial.rows_done < partial.height
    resumed = run_slide(he_png, predictor, out, **options)
    assert resumed["resumed_from_row"] == partial.rows_done
    assert resumed["windows_run"] < reference["windows_run"]
    clean, again = MaskStore.open(tmp_path / "clean" / "mask.zarr"), MaskStore.open(out / "mask.zarr")
    for level in range(clean.num_levels):
        assert np.array_equal(clean.level(level)[:], again.level(level)[:])
    assert np.array_equal(clean.probabilities[:], again.probabilities[:])
    assert clean.pixel_counts == again.pixel_counts
    assert np.array_equal(tifffile.imread(out / "mask.tif"), tifffile.imread(tmp_path / "clean" / "mask.tif"))


def test_resize_mode(samples: dict[str, Path], checkpoint: Path, tmp_path: Path) -> None:
    summary = segment_slide(samples["cmu_svs"], checkpoint, tmp_path, mode="resize", exports=("png",),
                            show_progress=False)
    store = MaskStore.open(tmp_path / "mask.zarr")
    with open_slide(samples["cmu_svs"]) as slide:
        assert store.level(0).shape == slide.size_at(4.0)[::-1]
        tissue = tissue_mask(slide)
    assert summary["mode"] == "resize" and summary["windows_run"] >= 1
    labels = store.level(0)[:]
    regions = tissue_regions(tissue, 4.0, labels.shape[1], labels.shape[0])
    assert summary["windows_run"] == len(regions)
    inside = np.zeros(labels.shape, bool)
    for x, y, w, h in regions:
        inside[y : y + h, x : x + w] = True
    assert (labels[~inside] == 0).all() and inside.mean() < 1  # outside every tissue region: background
    assert (labels[inside] != 0).any()
    assert (tmp_path / "overlay.png").is_file()


def test_resize_mode_gives_each_region_the_scores_infer_resize_gives_it(he_png: Path, predictor: SegmenterPredictor,
                                                                         tmp_path: Path) -> None:
    """Regions within the window are read at the run's MPP: their scores are infer's resize pass on their pixels,
    resized back in 64-row stripes exactly as in one piece."""
    window, mpp = 320, 2.0
    run_slide(he_png, predictor, tmp_path / "out", mpp=mpp, window=window, mode="resize", workers=0, slide_mpp=2.0,
              exports=(), save_probabilities=True, show_progress=False, clip_to_tissue=False, chunk=64)
    store = MaskStore.open(tmp_path / "out" / "mask.zarr")
    slide = open_slide(he_png, 2.0)
    image = slide.read(0, 0, *slide.size_at(mpp), mpp)
    regions = tissue_regions(tissue_mask(slide), mpp, image.shape[1], image.shape[0])
    count = np.zeros(image.shape[:2], int)
    for x, y, w, h in regions:
        count[y : y + h, x : x + w] += 1
    labels, probabilities = store.level(0)[:], store.probabilities[:]
    checked = 0
    for x, y, w, h in regions:
        assert max(w, h) <= window
        scores = predict_resized(to_tensor(image[y : y + h, x : x + w], "cpu"), predictor.predict, window,
                                 predictor.input_multiple).numpy()
        alone = count[y : y + h, x : x + w] == 1
        assert np.array_equal(labels[y : y + h, x : x + w][alone], scores.argmax(0)[alone])
        assert np.array_equal(probabilities[:, y : y + h, x : x + w][:, alone], scores[:, alone].astype(np.float16))
        checked += alone.sum()
        assert h > 64  # the region spans several stripes
    assert checked > 0 and (labels[count == 0] == 0).all()


def test_a_resize_run_of_the_earlier_algorithm_is_neither_reused_nor_resumed(he_png: Path, predictor: SegmenterPredictor,
                                                                            tmp_path: Path) -> None:
    """Resize mode changed algorithm (RESIZE_VERSION 2): a finished run of the canvas-paste algorithm, whose
    fingerprint has no resize_version, is another run's output, so the same command refuses to mix them."""
    out = tmp_path / "out"
    options = dict(mpp=2.0, window=320, mode="resize", workers=0, slide_mpp=2.0, exports=(), show_progress=False)
    first = run_slide(he_png, predictor, out, **options)
    assert first["fingerprint"]["resize_version"] == 2
    assert run_slide(he_png, predictor, out, **options)["reused"]
    summary = json.loads((out / "summary.json").read_text())
    del summary["fingerprint"]["resize_version"]
    (out / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(WsisegError, match="finished run with other settings: pass --overwrite"):
        run_slide(he_png, predictor, out, **options)
    assert "resize_version" not in run_slide(he_png, predictor, tmp_path / "w", **{**options, "mode": "windowslide"})[
        "fingerprint"]


@pytest.mark.slow
def test_tile_store_input(samples: dict[str, Path], checkpoint: Path, tmp_path: Path) -> None:
    from wsiseg.store.tiling import tile_slide

    store_path = tmp_path / "cmu.zarr"
    tile_slide(samples["cmu_svs"], store_path, 4.0, tile=128, workers=0, progress=False)
    segment_slide(store_path, checkpoint, tmp_path / "from_store", exports=(), workers=0, show_progress=False)
    segment_slide(samples["cmu_svs"], checkpoint, tmp_path / "from_slide", exports=(), workers=0, show_progress=False)
    a = MaskStore.open(tmp_path / "from_store" / "mask.zarr").level(0)[:]
    b = MaskStore.open(tmp_path / "from_slide" / "mask.zarr").level(0)[:]
    assert a.shape == b.shape
    # the store keeps tissue tiles only (white elsewhere), so windows at the tissue border may differ
    assert (a == b).mean() > 0.95
    with pytest.raises(WsisegError, match="MPP"):
        segment_slide(store_path, checkpoint, tmp_path / "wrong", mpp=2.0, exports=(), show_progress=False)

    # the labels go inside the store, as the spec places them: one level per image level
    from tests.ome_zarr_check import validate
    from wsiseg.export.mask import export_mask

    validate(tmp_path / "from_slide" / "mask.zarr", "label")  # a stand-alone label image of the slide
    labels_path = export_mask(tmp_path / "from_store" / "mask.zarr", "labels")
    assert labels_path == store_path / "labels" / "segmentation"
    image = validate(store_path, "image")
    label = validate(labels_path, "label")
    assert label.attributes.ome.image_label.source.image == "../../"
    image_levels = image.attributes.ome.multiscales[0].datasets
    label_levels = label.attributes.ome.multiscales[0].datasets
    assert len(label_levels) == len(image_levels) >= 3
    for image_level, label_level in zip(image_levels, label_levels):  # same pixels in space, level by level
        image_transforms = [list(t.scale if t.type == "scale" else t.translation)[1:] for t in
                            image_level.coordinateTransformations]
        label_transforms = [list(t.scale if t.type == "scale" else t.translation) for t in
                            label_level.coordinateTransformations]
        assert image_transforms == label_transforms
    source = MaskStore.open(tmp_path / "from_store" / "mask.zarr")
    copied = zarr.open_group(str(labels_path), mode="r")
    for level in range(source.num_levels):
        assert np.array_equal(copied[str(level)][:], source.level(level)[:])
    assert zarr.open_group(str(store_path / "labels"), mode="r").attrs["ome"]["labels"] == ["segmentation"]
    with pytest.raises(WsisegError, match="already exists"):
        export_mask(tmp_path / "from_store" / "mask.zarr", "labels")
    with pytest.raises(WsisegError, match="not a tile store"):
        export_mask(tmp_path / "from_slide" / "mask.zarr", "labels")


@pytest.mark.slow
def test_several_slides_on_a_dask_cluster(he_png: Path, samples: dict[str, Path], checkpoint: Path,
                                         tmp_path: Path) -> None:
    slides = [he_png, samples["unopenable_tiff"]]
    with real_cluster(tmp_path / "cluster") as address:
        results = segment_slides(slides, checkpoint, tmp_path, skip_errors=True, scheduler=address,
                                 slide_mpp=2.0, mpp=2.0, exports=(), workers=0)
    assert [r.status for r in results] == ["done", "failed"]
    assert (tmp_path / "he" / "mask.zarr").is_dir() and not (tmp_path / "unopenable_tiff").exists()
    assert "corrupt" in results[1].message
    with pytest.raises(WsisegError):
        segment_slides(slides[::-1], checkpoint, tmp_path / "stop", slide_mpp=2.0, mpp=2.0, exports=(), workers=0)


def test_batch_too_large_halves_and_says_so(predictor: SegmenterPredictor, caplog: pytest.LogCaptureFixture) -> None:
    class SmallDevice:
        num_outputs, class_names, colors = 3, CLASSES, None

        def predict(self, batch: torch.Tensor) -> torch.Tensor:
            if batch.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return predictor.predict(batch)

    batch = torch.rand(5, 3, 64, 64)
    runner = BatchRunner(SmallDevice(), 8)
    with caplog.at_level(logging.WARNING, logger="wsiseg"):
        scores = runner(batch)
    assert runner.batch_size == 2
    assert torch.allclose(scores, predictor.predict(batch), atol=1e-5)
    assert any("does not fit in device memory" in r.getMessage() for r in caplog.records)


def test_background_label() -> None:
    from wsiseg.engine.settings import background_label

    assert background_label(["tumour", "Background", "stroma"]) == 1  # a class named like background
    assert background_label(["tumour", "stroma"]) == 0
    assert background_label(["tumour", "stroma"], "stroma") == background_label(["tumour", "stroma"], "1") == 1
    with pytest.raises(WsisegError, match="not one of"):
        background_label(["tumour", "stroma"], "necrosis")


def test_run_slide_closes_the_slide_it_opened(he_png: Path, predictor: SegmenterPredictor, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from wsiseg.slide import Slide

    closed = []
    original = Slide.close
    monkeypatch.setattr(Slide, "close", lambda self: (closed.append(self.path), original(self))[-1])
    options = dict(mpp=2.0, window=64, batch_size=4, workers=0, slide_mpp=2.0, exports=(), show_progress=False)
    run_slide(he_png, predictor, tmp_path / "ok", **options)
    assert closed == [he_png]
    with pytest.raises(Crash):
        run_slide(he_png, CrashingPredictor(predictor, 0), tmp_path / "crash", **options)
    assert closed == [he_png, he_png]
    with open_slide(he_png, 2.0) as slide:  # a Slide the caller opened stays the caller's to close
        run_slide(slide, predictor, tmp_path / "given", **options)
        assert closed == [he_png, he_png]


def test_fseg_slide_closes_the_slides_it_opened(he_png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wsiseg
    from wsiseg.slide import Slide

    opened, closed = [], []
    original_init, original_close = Slide.__init__, Slide.close
    monkeypatch.setattr(Slide, "__init__", lambda self, *a, **k: (opened.append(self), original_init(self, *a, **k))[-1])
    monkeypatch.setattr(Slide, "close", lambda self: (closed.append(self), original_close(self))[-1])
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 300, 3), 255, np.uint8)).save(blank)
    with pytest.raises(WsisegError, match="no tissue"):
        wsiseg.fseg_slide([he_png, blank], tmp_path / "out", k=2, slide_mpp=2.0, mpp=2.0, device="cpu")
    assert {slide.path for slide in opened} == {he_png, blank}
    assert all(any(slide is done for done in closed) for slide in opened)  # every slide opened was closed


@pytest.mark.slow
@pytest.mark.timeout(90)  # before the fix, the run hung
def test_cluster_without_gpu_resources(he_png: Path, checkpoint: Path, tmp_path: Path) -> None:
    with real_cluster(tmp_path / "cluster", gpu=False) as address:
        # device auto on CPU-only workers: the task needs no GPU resource, so it is scheduled and runs
        results = segment_slides([he_png], checkpoint, tmp_path / "auto", scheduler=address,
                                 slide_mpp=2.0, mpp=2.0, exports=(), workers=0)
        assert [r.status for r in results] == ["done"]
        with pytest.raises(WsisegError, match="no worker .* GPU resource.*--resources GPU=1"):
            segment_slides([he_png], checkpoint, tmp_path / "cuda", scheduler=address,
                           device="cuda", slide_mpp=2.0, mpp=2.0, exports=(), workers=0)


def test_tissue_is_detected_once_per_view(he_png: Path, predictor: SegmenterPredictor, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import wsiseg.slide.tissue
    from wsiseg.engine.source import open_source

    calls = []
    original = wsiseg.slide.tissue.tissue_mask
    monkeypatch.setattr(wsiseg.slide.tissue, "tissue_mask", lambda *a, **k: (calls.append(1), original(*a, **k))[-1])
    view = open_source(he_png, 2.0, 2.0)
    assert view.tissue() is view.tissue()  # as F-Seg's no-tissue check and token sampling ask for it
    summary = run_slide(view, predictor, tmp_path / "out", mpp=2.0, window=64, batch_size=4, workers=0, exports=(),
                        show_progress=False)
    assert len(calls) == 1
    assert 0 < summary["tissue_fraction"] < 1 and summary["width"] == view.width


def test_fseg_detects_tissue_once_per_slide(samples: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import wsiseg
    import wsiseg.slide.tissue

    calls = []
    original = wsiseg.slide.tissue.tissue_mask
    monkeypatch.setattr(wsiseg.slide.tissue, "tissue_mask", lambda *a, **k: (calls.append(1), original(*a, **k))[-1])
    crop = tmp_path / "crop.png"
    Image.fromarray(np.asarray(Image.open(samples["hgsc_image"]).convert("RGB"))[:512, :512]).save(crop)
    wsiseg.fseg_slide(crop, tmp_path / "out", k=3, slide_mpp=0.5, mpp=1.0, window=128, device="cpu",
                      exports=("tiff",), show_progress=False)
    assert len(calls) == 1  # no-tissue check, token sampling and the slide loop share one detection


def test_several_slides_load_the_model_once(he_png: Path, samples: dict[str, Path], checkpoint: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from wsiseg import model_cache
    from wsiseg.engine.segment import SegmentModel

    loads: list[str] = []
    real = SegmentModel.load
    monkeypatch.setattr(SegmentModel, "load", lambda self, device: loads.append(self.checkpoint) or real(self, device))
    monkeypatch.setattr(model_cache, "_LAST", {})
    options = {"slide_mpp": 2.0, "mpp": 2.0, "exports": (), "workers": 0, "device": "cpu"}
    results = segment_slides([he_png, samples["cmu_svs"]], checkpoint, tmp_path, **options)
    assert [r.status for r in results] == ["done", "done"] and len(loads) == 1
