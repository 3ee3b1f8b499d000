"""Segmentation on a GPU: engine vs bare forward, reader scaling, the fast paths and their accuracy.

One short run on a CUDA machine (a few minutes; `tools/gpu_bench.sh` prepares and starts it on the
project's offline H200 machine), every figure from one process, each printed as a JSON line as soon
as it is measured and appended to --out:

 1. slide     a JPEG-tiled pyramidal TIFF mosaic of the real CMU sample (--mosaic N: N x N copies,
              0.499 MPP, 256 px JPEG tiles, written as tools/bench_tile.py does), read at its own MPP.
 2. readers   plain OpenSlide read_region loops over the engine's windows in W processes.
 3. bare      the predictor's forward on random windows already on the GPU (laid out as the loader
              delivers them), for each option: eager bf16 (timm's SDPA attention), math attention,
              channels-last, torch.compile, CUDA graphs (compile mode reduce-overhead), fp32 eager.
 4. accuracy  every option's labels against fp32 eager (TF32 off) on the same real windows: pixel
              agreement and the largest probability difference.
 5. engine    `run_slide` with W readers, eager and with the fastest option; the ratio to that
              option's bare forward (goal: >= 0.9); --prefetch sweeps the loader's prefetch depth at
              the largest W.
 6. pinned    host-to-device copies of one loader batch (uint8, the loader's layout) from pageable and
              from pinned memory, blocking and not, and the engine (eager, largest W) with the loader's
              pinned batches switched off and on (loader.PIN_MEMORY).
 7. nvjpeg    the slide's own level-0 JPEG tiles decoded in batches on the GPU (torchvision.io) vs
              Pillow in threads: tiles/s, and the 512 px windows/s they would feed at stride 384.

The model is a uni_v1-shaped ViT-L/16 with random weights and the fused decoder, 4 classes.
Compiled and graph options pad a short last batch to the full batch size, so they run one shape.
Without CUDA it is a smoke check of every path (tiny ViT, small mosaic, coarse MPP; figures meaningless).

    python tools/bench_segment_gpu.py [--mosaic 6] [--readers 1 4 8 16] [--options eager compile ...]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

OPTIONS = ("eager", "math_attention", "channels_last", "compile", "cudagraphs", "fp32")
CLASSES = ["background", "a", "b", "c"]


class Report:
    """Prints each result as a JSON line and appends it to a file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, part: str, **figures: Any) -> None:
        line = json.dumps({"part": part, **figures})
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(line + "\n")


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_layout(batch_size: int, size: int, device: Any) -> Any:
    """Random (B, 3, h, w) float windows with the loader's memory layout (a permuted NHWC batch)."""
    import torch

    return torch.rand(batch_size, size, size, 3, device=device).permute(0, 3, 1, 2)


class PaddedModel:
    """Runs a compiled model on one batch shape: shorter batches are padded, their outputs cut back."""

    def __init__(self, model: Any, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.input_multiple = getattr(model, "input_multiple", 1)

    def __call__(self, batch: Any) -> Any:
        count = batch.shape[0]
        if count == self.batch_size:
            return self.model(batch)
        padded = loader_layout(self.batch_size, batch.shape[-1], batch.device).zero_()
        padded[:count] = batch
        return self.model(padded)[:count]


class ChannelsLast:
    """A model whose 4-D weights and input are channels-last (the loader's batches already are)."""

    def __init__(self, model: Any) -> None:
        import torch

        self.model = model.to(memory_format=torch.channels_last)
        self.input_multiple = getattr(model, "input_multiple", 1)

    def __call__(self, batch: Any) -> Any:
        import torch

        return self.model(batch.contiguous(memory_format=torch.channels_last))


def build_predictors(model: Any, options: list[str], batch_size: int, device: Any) -> dict[str, Any]:
    """One SegmenterPredictor per option, all sharing the weights of `model` (copies where an option edits it)."""
    import torch

    from wsiseg.engine.predictors import SegmenterPredictor

    predictors = {}
    for option in options:
        precision = "fp32" if option == "fp32" else "bf16" if device.type == "cuda" else "fp32"
        if option in ("eager", "fp32"):
            runnable: Any = model
        elif option == "math_attention":
            runnable = copy.deepcopy(model)
            for module in runnable.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = False
        elif option == "channels_last":
            runnable = ChannelsLast(copy.deepcopy(model))
        elif option == "compile":
            runnable = PaddedModel(torch.compile(model), batch_size)
        elif option == "cudagraphs":
            runnable = PaddedModel(torch.compile(model, mode="reduce-overhead"), batch_size)
        else:
            raise ValueError(f"unknown option {option}")
        predictors[option] = SegmenterPredictor(runnable, CLASSES, precision=precision)
    return predictors


def fp32_exact() -> Any:
    """A context with TF32 off, so fp32 is the accuracy reference."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def context():  # type: ignore[no-untyped-def]
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    return context()


def bare_forward(predictor: Any, batch_size: int, size: int, device: Any, seconds: float) -> tuple[float, float]:
    """(tiles/s, warm-up seconds) of predictor.predict on random loader-layout windows on the device."""
    batch = loader_layout(batch_size, size, device)
    started = time.perf_counter()
    for _ in range(3):  # warm-up: compilation, graph capture, autotuning, allocator
        predictor.predict(batch)
    synchronize(device)
    warmup = time.perf_counter() - started
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or count < 3 * batch_size:
        predictor.predict(batch)
        count += batch_size
    synchronize(device)
    return count / (time.perf_counter() - started), warmup


def real_windows(slide: Path, positions: list[tuple[int, int]], size: int, mpp: float, count: int, device: Any) -> Any:
    """`count` tissue windows of the slide, spread over it, as the loader hands them to the model."""
    import torch

    from wsiseg.slide import open_slide

    picks = [positions[i] for i in np.linspace(0, len(positions) - 1, min(count, len(positions))).astype(int)]
    with open_slide(slide) as opened:
        pixels = np.stack([opened.read(x, y, size, size, mpp) for x, y in picks])
    return torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def accuracy(predictors: dict[str, Any], windows: Any, batch_size: int, report: Report) -> None:
    """Labels of every option against fp32 eager on the same windows."""
    import torch

    def scores(predictor: Any) -> Any:
        return torch.cat([predictor.predict(windows[i : i + batch_size]).float()
                          for i in range(0, windows.shape[0], batch_size)])

    with fp32_exact():
        reference = scores(predictors["fp32"])
    labels = reference.argmax(dim=1)
    for option, predictor in predictors.items():
        if option == "fp32":
            continue
        probabilities = scores(predictor)
        report("accuracy", option=option, windows=int(windows.shape[0]),
               label_agreement=round(float((probabilities.argmax(dim=1) == labels).float().mean()), 5),
               max_probability_difference=round(float((probabilities - reference).abs().max()), 5),
               note="random weights: agreement on a trained model is the figure that counts")


_HANDLE: Any = None


def _open(path: str) -> None:
    import openslide

    global _HANDLE
    _HANDLE = openslide.OpenSlide(path)


def _read(boxes: list[tuple[int, int, int]]) -> int:
    for x, y, size in boxes:
        np.asarray(_HANDLE.read_region((x, y), 0, (size, size)))
    return len(boxes)


def plain_readers(slide: Path, positions: list[tuple[int, int]], size: int, scale: float, workers: int) -> float:
    """Windows/s of `workers` processes running read_region over the level-0 boxes under the windows."""
    side = math.ceil(size * scale)
    boxes = [(math.floor(x * scale), math.floor(y * scale), side) for x, y in positions]
    chunks = [boxes[i : i + 16] for i in range(0, len(boxes), 16)]
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_open, initargs=(str(slide),)) as pool:
        pool.map(_read, [[]] * workers)
        started = time.perf_counter()
        assert sum(pool.map(_read, chunks, chunksize=1)) == len(boxes)
        return len(boxes) / (time.perf_counter() - started)


def engine(slide: Path, predictor: Any, mpp: float, size: int, batch_size: int, workers: int, device: Any,
           out: Path) -> dict[str, Any]:
    from wsiseg.engine.run import run_slide

    return run_slide(slide, predictor, out, mpp=mpp, window=size, overlap=0.25, batch_size=batch_size,
                     device=str(device), workers=workers, overwrite=True, exports=(), show_progress=False)


def copy_rates(batch_size: int, size: int, device: Any, report: Report, repeats: int = 20) -> None:
    """Host-to-device copies/s of one uint8 loader batch: pageable or pinned, blocking or not (CUDA only)."""
    import torch

    if device.type != "cuda":
        report("pinned", measure="copy", skipped="no CUDA device: pinned memory only matters for copies to one")
        return
    for pinned in (False, True):
        host = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, pin_memory=pinned)
        for non_blocking in (False, True):
            host.to(device, non_blocking=non_blocking)
            synchronize(device)
            started = time.perf_counter()
            for _ in range(repeats):
                host.to(device, non_blocking=non_blocking)
            synchronize(device)
            seconds = (time.perf_counter() - started) / repeats
            report("pinned", measure="copy", pinned=pinned, non_blocking=non_blocking, batch_size=batch_size,
                   ms_per_batch=round(1000 * seconds, 3), gb_per_s=round(host.numel() / seconds / 1e9, 2))


def pinned_engine(slide: Path, predictor: Any, mpp: float, size: int, batch_size: int, workers: int, device: Any,
                  out: Path, report: Report) -> None:
    """The engine with the loader's batches in pageable and in pinned memory (loader.PIN_MEMORY)."""
    from wsiseg.engine import loader

    default = loader.PIN_MEMORY
    for pinned in (False, True):
        loader.PIN_MEMORY = pinned
        try:
            summary = engine(slide, predictor, mpp, size, batch_size, workers, device, out)
        finally:
            loader.PIN_MEMORY = default
        report("pinned", measure="engine", pinned=pinned, default=pinned == default, readers=workers,
               tiles_per_s=round(summary["tiles_per_s"], 1))


def jpeg_tiles(slide: Path, limit: int) -> list[bytes]:
    """The raw JPEG streams of the first `limit` level-0 tiles (shared JPEG tables merged in)."""
    import tifffile

    streams = []
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        tables = page.jpegtables
        handle = tif.filehandle
        for offset, count in list(zip(page.dataoffsets, page.databytecounts))[:limit]:
            if count == 0:
                continue
            handle.seek(offset)
            data = handle.read(count)
            streams.append(tables[:-2] + data[2:] if tables else data)
    return streams


def nvjpeg(slide: Path, device: Any, report: Report, limit: int, threads: int, stride: int) -> None:
    """GPU (torchvision.io, nvJPEG on CUDA) vs Pillow decoding of the slide's own JPEG tiles."""
    import torch
    from PIL import Image

    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        report("nvjpeg", skipped="torchvision is not installed")
        return
    streams = jpeg_tiles(slide, limit)
    tensors = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    tile = Image.open(io.BytesIO(streams[0])).size[0]

    def pillow(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(pillow, streams[:threads]))
        started = time.perf_counter()
        decoded = list(pool.map(pillow, streams))
        cpu_rate = len(streams) / (time.perf_counter() - started)
    chunk = 256
    decode_jpeg(tensors[:chunk], device=device)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    gpu = []
    for i in range(0, len(tensors), chunk):
        gpu.extend(decode_jpeg(tensors[i : i + chunk], device=device))
    synchronize(device)
    gpu_rate = len(tensors) / (time.perf_counter() - started)
    difference = max(float(np.abs(g.permute(1, 2, 0).cpu().numpy().astype(int) - d.astype(int)).mean())
                     for g, d in zip(gpu[:32], decoded[:32]))
    per_window = (stride / tile) ** 2  # new tiles per window when every tile is decoded once
    report("nvjpeg", device=str(device), tiles=len(streams), tile=tile, pillow_threads=threads,
           pillow_tiles_per_s=round(cpu_rate, 1), gpu_tiles_per_s=round(gpu_rate, 1),
           pillow_windows_per_s=round(cpu_rate / per_window, 1), gpu_windows_per_s=round(gpu_rate / per_window, 1),
           mean_abs_difference_vs_pillow=round(difference, 3))


def engine_part(slide: Path, predictors: dict[str, Any], bare: dict[str, float], mpp: float, device: Any,
                args: argparse.Namespace, report: Report) -> None:
    """The engine at each reader count (eager and the fastest option), prefetch depths, pinned memory."""
    from wsiseg.engine import loader

    fastest = max((o for o in bare if o != "fp32"), key=bare.get, default=None)
    runs = [("eager", w) for w in args.readers] if "eager" in bare else []
    if fastest not in (None, "eager"):
        runs += [(fastest, w) for w in args.readers]
    for option, workers in runs:
        summary = engine(slide, predictors[option], mpp, args.size, args.batch_size, workers, device,
                         args.workdir / "engine_out")
        report("engine", option=option, readers=workers, windows=summary["windows_run"],
               tiles_per_s=round(summary["tiles_per_s"], 1), bare_tiles_per_s=round(bare[option], 1),
               engine_vs_bare=round(summary["tiles_per_s"] / bare[option], 3), prefetch=loader.PREFETCH_BATCHES,
               goal_met=summary["tiles_per_s"] >= 0.9 * bare[option], timings=summary["timings"])
    default_depth = loader.PREFETCH_BATCHES
    for depth in args.prefetch if "eager" in bare else []:
        loader.PREFETCH_BATCHES = depth
        try:
            summary = engine(slide, predictors["eager"], mpp, args.size, args.batch_size, max(args.readers), device,
                             args.workdir / "engine_out")
        finally:
            loader.PREFETCH_BATCHES = default_depth
        report("prefetch", option="eager", readers=max(args.readers), prefetch=depth,
               tiles_per_s=round(summary["tiles_per_s"], 1))

    copy_rates(args.batch_size, args.size, device, report)
    if "eager" in bare:
        pinned_engine(slide, predictors["eager"], mpp, args.size, args.batch_size, max(args.readers), device,
                      args.workdir / "engine_out", report)


def main() -> None:
    import torch

    from bench_tile import make_mosaic
    from wsiseg.engine.source import open_source
    from wsiseg.models.segmenter import build_segmenter
    from wsiseg.samples import cached_sample
    from wsiseg.slide import open_slide
    from wsiseg.slide.grid import Grid

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="uni_v1" if cuda else "timm:test_vit")
    parser.add_argument("--size", type=int, default=512 if cuda else 64)
    parser.add_argument("--batch-size", type=int, default=32 if cuda else 4)
    parser.add_argument("--mosaic", type=int, default=6 if cuda else 1, help="copies per side of the CMU sample")
    parser.add_argument("--mpp", type=float, default=None if cuda else 2.0,
                        help="segmentation MPP (default on CUDA: the slide's own)")
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 4, 8, 16] if cuda else [1])
    parser.add_argument("--options", nargs="+", choices=OPTIONS,
                        default=list(OPTIONS) if cuda else ["eager", "math_attention", "channels_last", "fp32"])
    parser.add_argument("--prefetch", type=int, nargs="*", default=[2, 8] if cuda else [],
                        help="extra prefetch depths for the engine at the largest reader count")
    parser.add_argument("--seconds", type=float, default=8.0 if cuda else 1.0, help="duration of each bare forward")
    parser.add_argument("--accuracy-windows", type=int, default=64 if cuda else 4)
    parser.add_argument("--jpeg-tiles", type=int, default=4096 if cuda else 64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsiseg-gpu-bench"))
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines here too")
    args = parser.parse_args()
    report = Report(args.out)
    device = torch.device("cuda" if cuda else "cpu")
    args.workdir.mkdir(parents=True, exist_ok=True)
    report("setup", device=torch.cuda.get_device_name() if cuda else "cpu (smoke check only)", torch=torch.__version__,
           model=args.model, size=args.size, batch_size=args.batch_size, cpus=multiprocessing.cpu_count())

    started = time.perf_counter()
    slide = args.workdir / f"cmu_mosaic{args.mosaic}.tif"
    if not slide.exists():
        make_mosaic(cached_sample("cmu_svs"), args.mosaic, slide)
    with open_slide(slide) as opened:
        slide_mpp = opened.mpp
    mpp = args.mpp or slide_mpp
    view = open_source(slide, mpp)
    grid = Grid(view.width, view.height, args.size, args.size - round(0.25 * args.size))
    positions = grid.tissue_positions(view.tissue(), mpp)
    view.reader.close()
    report("slide", path=str(slide), size=[view.width, view.height], mpp=mpp, windows=len(positions),
           seconds=round(time.perf_counter() - started, 1))

    for workers in args.readers:
        report("readers", processes=workers, plain_read_region_per_s=round(
            plain_readers(slide, positions, args.size, mpp / slide_mpp, workers), 1))

    torch.manual_seed(0)
    model_cfg = {"name": args.model, "finetune_mode": "frozen", "input_size": args.size, "decoder": "fused"}
    model = build_segmenter(model_cfg, len(CLASSES)).to(device).eval()
    predictors = build_predictors(model, args.options, args.batch_size, device)
    bare = {}
    for option, predictor in predictors.items():
        try:
            with fp32_exact() if option == "fp32" else _nothing():
                rate, warmup = bare_forward(predictor, args.batch_size, args.size, device, args.seconds)
        except Exception as error:  # noqa: BLE001 - an option that fails on this machine is reported, not fatal
            report("bare", option=option, failed=f"{type(error).__name__}: {error}"[:300])
            continue
        bare[option] = rate
        report("bare", option=option, tiles_per_s=round(rate, 1), warmup_s=round(warmup, 1),
               vs_eager=round(rate / bare["eager"], 3) if "eager" in bare else None)
    if "fp32" in bare:
        accuracy({k: v for k, v in predictors.items() if k in bare}, real_windows(
            slide, positions, args.size, mpp, args.accuracy_windows, device), args.batch_size, report)

    engine_part(slide, predictors, bare, mpp, device, args, report)

    nvjpeg(slide, device, report, args.jpeg_tiles, min(16, multiprocessing.cpu_count()), args.size - round(0.25 * args.size))


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


if __name__ == "__main__":
    main()
