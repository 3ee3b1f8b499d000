"""The slide loop's own ceiling on the CPU, and the engine against the bare model forward.

1. Ceiling: `run_slide` with a predictor that costs nothing against a plain OpenSlide read_region
   loop over the same windows in the same number of processes. The slide is a JPEG-tiled pyramidal
   TIFF mosaic of the real CMU sample (0.499 MPP, as bench_tile.py writes it), segmented at its own
   MPP and at 0.5 (every window rescaled); the plain loop reads the level-0 box under each window.
   Reported per setting: windows/s of both (the engine's loop phase, its reader start included, and
   the plain pool including its start), their ratio (goal: >= 0.85 with a core left for the main
   process, i.e. W = cores - 1), CPU time per window of each side (all its processes: the robust
   figure on a shared machine), and of the engine's main process in the loop: all of it (reader
   threads included, where readers are threads), the blend (add and finalise, main thread) and the
   write (tissue clip and mask store, writer thread).
2. Model: segment (the demo model: EfficientNet-Lite0 + fused decoder, 256 px, 4 classes) and F-Seg
   (EfficientNet-Lite0 features, k = 8, 512 px) end to end on the CMU slide at 0.5 MPP against the
   bare predictor forward on random windows of the same batch size and memory layout (goal: segment
   >= 0.9); for F-Seg also against its feature forward alone.

Both sides of every ratio run alternately in the same process, `--repeats` times; the best run of
each counts. The load average is printed: say in a report when the machine was shared.

    .venv/bin/python tools/bench_engine_ceiling.py [--parts ceiling model] [--workers 1 2] [--mpp 0.499 0.5]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import openslide

sys.path.insert(0, str(Path(__file__).resolve().parent))

WINDOW = 512
BATCH = 16


class FreePredictor:
    """A predictor that costs nothing: the same precomputed scores for every batch.

    The scores are smooth fields (blobs a few tens of pixels wide), so the labels and their
    compression in the mask store cost what they cost with a real model, not what noise costs.
    It takes the windows as read (uint8: the engine converts nothing for it); with
    `uint8_input=False` it asks for float windows, as a model does, and the engine converts them.
    """

    num_outputs = 4
    class_names = ["background", "a", "b", "c"]
    colors = None
    input_multiple = 1

    def __init__(self, window: int, batch_size: int, uint8_input: bool = True) -> None:
        import torch

        self.uint8_input = uint8_input
        generator = torch.Generator().manual_seed(0)
        coarse = torch.rand(batch_size, 4, window // 64, window // 64, generator=generator)
        fields = torch.nn.functional.interpolate(coarse, size=(window, window), mode="bilinear", align_corners=False)
        self.scores = torch.softmax(8 * fields, dim=1)

    def predict(self, batch: Any) -> Any:
        return self.scores[: batch.shape[0]]


class Meter:
    """CPU seconds of the main process in the loop: blend (main thread), write (writer thread), all threads."""

    def __init__(self) -> None:
        self.blend = self.write = self.loop = 0.0


@contextmanager
def metered(meter: Meter):  # type: ignore[no-untyped-def]
    """Patch the slide loop's blender, writer and window loop with CPU timers for one run."""
    from wsiseg.engine import run, windows

    class TimedBlender(windows.StripeBlender):
        def add(self, score: Any, x: int, y: int) -> None:
            started = time.thread_time()
            super().add(score, x, y)
            meter.blend += time.thread_time() - started

        def close(self) -> None:
            started = time.thread_time()
            super().close()
            meter.blend += time.thread_time() - started

    class TimedWriter(windows.BackgroundWriter):
        def _run(self) -> None:
            started = time.thread_time()
            super()._run()
            meter.write += time.thread_time() - started

    def timed_loop(*args: Any, **kwargs: Any) -> int:
        started = time.process_time()
        try:
            return original_loop(*args, **kwargs)
        finally:
            meter.loop += time.process_time() - started

    originals = windows.StripeBlender, windows.BackgroundWriter, run.predict_windows
    original_loop = run.predict_windows
    windows.StripeBlender, windows.BackgroundWriter, run.predict_windows = TimedBlender, TimedWriter, timed_loop
    try:
        yield meter
    finally:
        windows.StripeBlender, windows.BackgroundWriter, run.predict_windows = originals


def children_cpu() -> float:
    """CPU seconds of the finished (joined) child processes of this process."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def engine_positions(path: Path, mpp: float) -> list[tuple[int, int]]:
    """The tissue windows `run_slide` visits at `mpp` (its default overlap 0.25)."""
    from wsiseg.engine.source import open_source
    from wsiseg.slide.grid import Grid

    view = open_source(path, mpp)
    try:
        grid = Grid(view.width, view.height, WINDOW, WINDOW - round(0.25 * WINDOW))
        return grid.tissue_positions(view.tissue(), mpp)
    finally:
        view.reader.close()


_HANDLE: openslide.OpenSlide | None = None


def _open(path: str) -> None:
    global _HANDLE
    _HANDLE = openslide.OpenSlide(path)


def _read(boxes: list[tuple[int, int, int, int]]) -> int:
    assert _HANDLE is not None
    for x, y, w, h in boxes:
        np.asarray(_HANDLE.read_region((x, y), 0, (w, h)))
    return len(boxes)


def plain_loop(path: Path, boxes: list[tuple[int, int, int, int]], workers: int) -> tuple[float, float]:
    """(seconds, reader CPU seconds) of `workers` forked processes reading every box once, start included."""
    chunks = [boxes[i : i + BATCH] for i in range(0, len(boxes), BATCH)]
    cpu, started = children_cpu(), time.perf_counter()
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_open, initargs=(str(path),))
    assert sum(pool.map(_read, chunks, chunksize=1)) == len(boxes)
    pool.close()
    pool.join()
    return time.perf_counter() - started, children_cpu() - cpu


def engine_loop(path: Path, mpp: float, workers: int, out: Path, uint8_input: bool = True) -> dict[str, float]:
    """One `run_slide` with the free predictor: loop seconds, windows, main-process and reader CPU seconds."""
    from wsiseg.engine.run import run_slide

    meter = Meter()
    cpu = children_cpu()
    with metered(meter):
        summary = run_slide(path, FreePredictor(WINDOW, BATCH, uint8_input), out, mpp=mpp, window=WINDOW, batch_size=BATCH,
                            device="cpu", workers=workers, overwrite=True, exports=(), show_progress=False)
    return {"seconds": summary["timings"]["predict_s"], "windows": summary["windows_run"], "blend": meter.blend,
            "write": meter.write, "main": meter.loop, "readers": children_cpu() - cpu}


def ceiling(slide: Path, mpps: list[float], workers: list[int], repeats: int, folder: Path) -> list[dict[str, Any]]:
    """Free-predictor engine vs plain read loop, alternating, for every MPP and reader count."""
    with openslide.OpenSlide(str(slide)) as handle:
        slide_mpp = float(handle.properties[openslide.PROPERTY_NAME_MPP_X])
    settings = []
    for mpp in mpps:
        scale = mpp / slide_mpp
        positions = engine_positions(slide, mpp)
        boxes = []
        for x, y in positions:  # the level-0 box under each window
            x0, y0 = math.floor(x * scale), math.floor(y * scale)
            boxes.append((x0, y0, math.ceil((x + WINDOW) * scale) - x0, math.ceil((y + WINDOW) * scale) - y0))
        for count in workers:
            settings.append({"mpp": mpp, "workers": count, "boxes": boxes, "engine": [], "plain": []})
    for _ in range(repeats):
        for setting in settings:
            setting["engine"].append(engine_loop(slide, setting["mpp"], setting["workers"], folder / "engine_out"))
            setting["plain"].append(plain_loop(slide, setting["boxes"], setting["workers"]))
    rows = []
    for setting in settings:
        engine = min(setting["engine"], key=lambda run: run["seconds"])
        plain_s, plain_cpu = min(setting["plain"])
        n = engine["windows"]
        assert n == len(setting["boxes"])
        rows.append({
            "mpp": setting["mpp"], "workers": setting["workers"], "windows": n,
            "plain_per_s": round(n / plain_s, 1), "engine_per_s": round(n / engine["seconds"], 1),
            "ratio": round(plain_s / engine["seconds"], 3),
            "engine_cpu_ms_per_window": round(1000 * (engine["main"] + engine["readers"]) / n, 2),
            "plain_cpu_ms_per_window": round(1000 * plain_cpu / n, 2),
            "main_cpu_ms_per_window": round(1000 * engine["main"] / n, 2),
            "blend_cpu_ms_per_window": round(1000 * engine["blend"] / n, 2),
            "write_cpu_ms_per_window": round(1000 * engine["write"] / n, 2),
            "reader_process_cpu_ms_per_window": round(1000 * engine["readers"] / n, 2),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bare_rate(predictor: Any, batch_size: int, window: int, windows: int) -> float:
    """Windows/s of predictor.predict on random windows (`windows` of them, after one warm-up batch).

    The windows have the loader's memory layout (a permuted NHWC batch): convolutions on the CPU run
    at another speed on channels-last input.
    """
    import torch

    batch = torch.rand(batch_size, window, window, 3).permute(0, 3, 1, 2)
    predictor.predict(batch)
    started = time.perf_counter()
    for _ in range(max(1, math.ceil(windows / batch_size))):
        predictor.predict(batch)
    return max(1, math.ceil(windows / batch_size)) * batch_size / (time.perf_counter() - started)


class FeaturesOnly:
    """An F-Seg predictor's feature forward alone (no projection, no upsampling)."""

    def __init__(self, predictor: Any) -> None:
        self.extractor = predictor.extractor

    def predict(self, batch: Any) -> Any:
        return self.extractor(batch)


def engine_vs_bare(name: str, predictor: Any, slide: Path, window: int, batch_size: int, workers: int, repeats: int,
                   folder: Path, features_only: Any = None) -> dict[str, Any]:
    """`run_slide` with `predictor` at 0.5 MPP vs its bare forward (and `features_only`'s), alternating; best of each."""
    from wsiseg.engine.run import run_slide

    engine, bare, features = [], [], []
    for _ in range(repeats):
        summary = run_slide(slide, predictor, folder / name, mpp=0.5, window=window, batch_size=batch_size,
                            device="cpu", workers=workers, overwrite=True, exports=(), show_progress=False)
        engine.append(summary["tiles_per_s"])
        bare.append(bare_rate(predictor, batch_size, window, summary["windows_run"]))
        if features_only is not None:
            features.append(bare_rate(features_only, batch_size, window, summary["windows_run"]))
    row = {"predictor": name, "window": window, "batch_size": batch_size, "workers": workers,
           "windows": summary["windows_run"], "bare_per_s": round(max(bare), 2), "engine_per_s": round(max(engine), 2),
           "ratio": round(max(engine) / max(bare), 3)}
    if features:
        row.update(bare_features_per_s=round(max(features), 2), ratio_to_features=round(max(engine) / max(features), 3))
    print(json.dumps(row), flush=True)
    return row


def model_part(workers: int, repeats: int, folder: Path) -> list[dict[str, Any]]:
    """Segment (the demo model) and F-Seg (k = 8) end to end vs their bare forwards on the CMU slide."""
    import yaml

    import wsiseg
    from wsiseg.demo import DEMO_CONFIG
    from wsiseg.engine.predictors import SegmenterPredictor
    from wsiseg.fseg.features import load_extractor
    from wsiseg.fseg.predictor import FsegPredictor
    from wsiseg.models.segmenter import build_segmenter

    slide = wsiseg.fetch_samples()["cmu_svs"]
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    model = build_segmenter(config["model"], config["dataset"]["num_classes"]).eval()
    segmenter = SegmenterPredictor(model, config["dataset"]["class_names"])
    rows = [engine_vs_bare("segment (demo model)", segmenter, slide, config["model"]["input_size"], 16, workers,
                           repeats, folder)]
    bank = folder / "bank.safetensors"
    wsiseg.fit_concepts(slide, bank, ks=[8], mpp=0.5, window=WINDOW, device="cpu", overwrite=True)
    from wsiseg.fseg.concepts import load_bank

    fseg = FsegPredictor(load_extractor(device="cpu"), load_bank(bank).get(8))
    rows.append(engine_vs_bare("fseg k=8", fseg, slide, WINDOW, 8, workers, repeats, folder, FeaturesOnly(fseg)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["ceiling", "model"], choices=["ceiling", "model"])
    parser.add_argument("--mosaic", type=int, default=4, help="copies per side of the CMU sample (4: 8880 x 11868)")
    parser.add_argument("--mpp", type=float, nargs="+", default=[0.499, 0.5])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="reader processes of the ceiling")
    parser.add_argument("--model-workers", type=int, default=1, help="reader processes beside the model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the mosaic here between runs")
    args = parser.parse_args()
    import torch

    from bench_tile import make_mosaic
    from wsiseg.samples import fetch_samples

    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"cpus": os.cpu_count(), "torch_threads": args.threads,
                              "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.workdir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        if "ceiling" in args.parts:
            slide = folder / f"cmu_mosaic{args.mosaic}.tif"
            if not slide.exists():
                partial = slide.with_name(f".{slide.name}.partial")
                make_mosaic(fetch_samples()["cmu_svs"], args.mosaic, partial)
                partial.rename(slide)
            report["ceiling"] = ceiling(slide, args.mpp, args.workers, args.repeats, folder)
        if "model" in args.parts:
            report["model"] = model_part(args.model_workers, args.repeats, folder)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
