"""The slide loop's own ceiling on the CPU, the loader's prefetch depth, and the engine against the bare model forward.

1. Ceiling: `run_slide` with a predictor that costs nothing against a plain OpenSlide read_region
   loop over the same windows in the same number of processes. The slide is a JPEG-tiled pyramidal
   TIFF mosaic of the real CMU sample (0.499 MPP, as bench_tile.py writes it), segmented at its own
   MPP and at 0.5 (every window rescaled); the plain loop reads the level-0 box under each window.
   Reported per setting: windows/s of both (the engine's loop phase, its reader start included, and
   the plain pool including its start), their ratio (goal: >= 0.85 with a core left for the main
   process, i.e. W = cores - 1), CPU time per window of each side (all its processes: the robust
   figure on a shared machine), and of the engine's main process in the loop: all of it (reader
   threads included), the reads (reader threads), all but the reads, the blend (add and finalise,
   main thread), the write (tissue clip and mask store, writer thread), the batch runner (the float
   conversion with --float-input: the free predictor takes uint8 windows otherwise), and the main
   thread's wait for the readers (wall-clock).
2. Prefetch: the same engine run at each --prefetch depth (batches each reader keeps ahead):
   windows/s and the main thread's wait for the readers per window.
3. Model: segment (the demo model: EfficientNet-Lite0 + fused decoder, 256 px, 4 classes) and F-Seg
   (EfficientNet-Lite0 features, k = 8, 512 px) end to end on the CMU slide at 0.5 MPP against the
   bare predictor forward on random windows of the same batch size and memory layout (goal: segment
   >= 0.9); for F-Seg also against its feature forward alone.

Both sides of every ratio run alternately in the same process, `--repeats` times; the best run of
each counts. The load average is printed: say in a report when the machine was shared (wall-clock
ratios then mean little; the CPU figures per window still do).

    .venv/bin/python tools/bench_engine_ceiling.py [--parts ceiling prefetch model] [--workers 1 2]
        [--mpp 0.499 0.5] [--float-input] [--prefetch 1 2 4 8]
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
import threading
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
    """The engine's main process in the loop: CPU seconds of the blend (main thread), the write (writer
    thread), the batch runner (the float conversion, when the predictor asks for floats) and of all
    threads, of the reader threads' reads; and the main thread's wall seconds spent waiting for the
    next batch from the readers."""

    def __init__(self) -> None:
        self.blend = self.write = self.convert = self.loop = self.wait = self.read = 0.0
        self.lock = threading.Lock()


@contextmanager
def metered(meter: Meter):  # type: ignore[no-untyped-def]
    """Patch the slide loop's blender, writer, batch runner, loader and window loop with timers for one run."""
    from wsiseg.engine import loader, run, windows

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

    class TimedRunner(windows.BatchRunner):
        def __call__(self, batch: Any) -> Any:
            started = time.thread_time()
            try:
                return super().__call__(batch)
            finally:
                meter.convert += time.thread_time() - started

    def timed_read(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return original_read(*args, **kwargs)
        finally:
            with meter.lock:
                meter.read += time.thread_time() - started

    def timed_batches(*args: Any, **kwargs: Any) -> Any:
        batches = original_batches(*args, **kwargs)
        try:
            while True:
                started = time.perf_counter()
                item = next(batches, None)
                meter.wait += time.perf_counter() - started
                if item is None:
                    return
                yield item
        finally:
            batches.close()

    def timed_loop(*args: Any, **kwargs: Any) -> int:
        started = time.process_time()
        try:
            return original_loop(*args, **kwargs)
        finally:
            meter.loop += time.process_time() - started

    names = [(windows, "StripeBlender", TimedBlender), (windows, "BackgroundWriter", TimedWriter),
             (windows, "BatchRunner", TimedRunner), (loader, "iterate_batches", timed_batches),
             (loader, "_read_batch", timed_read), (run, "predict_windows", timed_loop)]
    originals = [(module, name, getattr(module, name)) for module, name, _ in names]
    original_batches, original_read, original_loop = loader.iterate_batches, loader._read_batch, run.predict_windows
    for module, name, timed in names:
        setattr(module, name, timed)
    try:
        yield meter
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


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
    """One `run_slide` with the free predictor: loop seconds, windows, and the `Meter` figures."""
    from wsiseg.engine.run import run_slide

    meter = Meter()
    cpu = children_cpu()
    with metered(meter):
        summary = run_slide(path, FreePredictor(WINDOW, BATCH, uint8_input), out, mpp=mpp, window=WINDOW,
                            batch_size=BATCH, device="cpu", workers=workers, overwrite=True, exports=(),
                            show_progress=False)
    return {"seconds": summary["timings"]["predict_s"], "windows": summary["windows_run"], "blend": meter.blend,
            "write": meter.write, "convert": meter.convert, "main": meter.loop, "read": meter.read,
            "wait": meter.wait, "readers": children_cpu() - cpu}


def engine_figures(engine: dict[str, float]) -> dict[str, float]:
    """Per-window figures (ms) of one engine run: CPU of the main process and its parts, and the wait."""
    n = engine["windows"]
    per_window = lambda seconds: round(1000 * seconds / n, 2)  # noqa: E731
    return {
        "engine_cpu_ms_per_window": per_window(engine["main"] + engine["readers"]),
        "main_cpu_ms_per_window": per_window(engine["main"]),
        "read_cpu_ms_per_window": per_window(engine["read"]),
        "main_minus_reads_cpu_ms_per_window": per_window(engine["main"] - engine["read"]),
        "blend_cpu_ms_per_window": per_window(engine["blend"]),
        "write_cpu_ms_per_window": per_window(engine["write"]),
        "convert_cpu_ms_per_window": per_window(engine["convert"]),
        "wait_ms_per_window": per_window(engine["wait"]),
        "reader_process_cpu_ms_per_window": per_window(engine["readers"]),
    }


def level0_boxes(slide: Path, mpp: float) -> list[tuple[int, int, int, int]]:
    """The level-0 box under each window `run_slide` visits at `mpp` (what the plain loop reads)."""
    with openslide.OpenSlide(str(slide)) as handle:
        scale = mpp / float(handle.properties[openslide.PROPERTY_NAME_MPP_X])
    boxes = []
    for x, y in engine_positions(slide, mpp):
        x0, y0 = math.floor(x * scale), math.floor(y * scale)
        boxes.append((x0, y0, math.ceil((x + WINDOW) * scale) - x0, math.ceil((y + WINDOW) * scale) - y0))
    return boxes


def ceiling(slide: Path, mpps: list[float], workers: list[int], repeats: int, folder: Path,
            uint8_input: bool = True) -> list[dict[str, Any]]:
    """Free-predictor engine vs plain read loop, alternating, for every MPP and reader count."""
    settings = []
    for mpp in mpps:
        boxes = level0_boxes(slide, mpp)
        for count in workers:
            settings.append({"mpp": mpp, "workers": count, "boxes": boxes, "engine": [], "plain": []})
    for _ in range(repeats):
        for setting in settings:
            setting["engine"].append(engine_loop(slide, setting["mpp"], setting["workers"], folder / "engine_out",
                                                 uint8_input))
            setting["plain"].append(plain_loop(slide, setting["boxes"], setting["workers"]))
    rows = []
    for setting in settings:
        engine = min(setting["engine"], key=lambda run: run["seconds"])
        plain_s, plain_cpu = min(setting["plain"])
        n = engine["windows"]
        assert n == len(setting["boxes"])
        rows.append({
            "mpp": setting["mpp"], "workers": setting["workers"], "windows": n,
            "predictor_input": "uint8" if uint8_input else "float",
            "plain_per_s": round(n / plain_s, 1), "engine_per_s": round(n / engine["seconds"], 1),
            "ratio": round(plain_s / engine["seconds"], 3),
            "plain_cpu_ms_per_window": round(1000 * plain_cpu / n, 2), **engine_figures(engine),
            "load_average_1min": round(os.getloadavg()[0], 2),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def prefetch_part(slide: Path, mpp: float, depths: list[int], workers: list[int], repeats: int,
                  folder: Path) -> list[dict[str, Any]]:
    """The free-predictor engine at each prefetch depth (batches each reader keeps ahead), alternating:
    windows/s, and how long the main thread waits for the readers per window."""
    from wsiseg.engine import loader

    default = loader.PREFETCH_BATCHES
    runs: dict[tuple[int, int], list[dict[str, float]]] = {(w, d): [] for w in workers for d in depths}
    try:
        for _ in range(repeats):
            for count, depth in runs:
                loader.PREFETCH_BATCHES = depth
                runs[count, depth].append(engine_loop(slide, mpp, count, folder / "engine_out"))
    finally:
        loader.PREFETCH_BATCHES = default
    rows = []
    for (count, depth), done in runs.items():
        engine = min(done, key=lambda run: run["seconds"])
        rows.append({"mpp": mpp, "workers": count, "prefetch": depth, "default": depth == default,
                     "engine_per_s": round(engine["windows"] / engine["seconds"], 1), **engine_figures(engine),
                     "load_average_1min": round(os.getloadavg()[0], 2)})
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
    parser.add_argument("--parts", nargs="+", default=["ceiling", "model"], choices=["ceiling", "prefetch", "model"])
    parser.add_argument("--mosaic", type=int, default=4, help="copies per side of the CMU sample (4: 8880 x 11868)")
    parser.add_argument("--mpp", type=float, nargs="+", default=[0.499, 0.5])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="reader processes of the ceiling")
    parser.add_argument("--model-workers", type=int, default=1, help="reader processes beside the model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--float-input", action="store_true",
                        help="the free predictor asks for float windows (the engine converts them, as for a model)")
    parser.add_argument("--prefetch", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="prefetch depths of the prefetch part (at the first --mpp)")
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
        slide = folder / f"cmu_mosaic{args.mosaic}.tif"
        if {"ceiling", "prefetch"} & set(args.parts) and not slide.exists():
            partial = slide.with_name(f".{slide.name}.partial")
            make_mosaic(fetch_samples()["cmu_svs"], args.mosaic, partial)
            partial.rename(slide)
        if "ceiling" in args.parts:
            report["ceiling"] = ceiling(slide, args.mpp, args.workers, args.repeats, folder, not args.float_input)
        if "prefetch" in args.parts:
            report["prefetch"] = prefetch_part(slide, args.mpp[0], args.prefetch, args.workers, args.repeats, folder)
        if "model" in args.parts:
            report["model"] = model_part(args.model_workers, args.repeats, folder)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
