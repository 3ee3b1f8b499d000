"""Peak host memory of `run_slide` on synthetic slides of 60,000 x 20,000 and 60,000 x 60,000 pixels.

Goal: under 3 GB, and the two within 10% of each other (memory grows with slide width, never
with height). Each slide is segmented in a fresh subprocess (CPU, a tiny 2-layer conv model,
reader processes on), whose peak resident set size is read from getrusage: the main process
and the largest reader process separately, with the phase (last log line) of the main peak.

    .venv/bin/python tools/bench_segment_memory.py [--workdir /tmp/wsiseg-bench] [--mpp 1.0]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = [(60_000, 20_000), (60_000, 60_000)]
GOAL_BYTES = 3 * 1024**3


class TinyConvPredictor:
    """A real, tiny model: two convolutions (random weights) and a softmax over 3 classes."""

    def __init__(self) -> None:
        import torch

        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1)
        ).eval()
        self.num_outputs, self.class_names, self.colors = 3, ["background", "tissue_a", "tissue_b"], None

    def predict(self, batch):  # type: ignore[no-untyped-def]
        import torch

        with torch.inference_mode():
            return torch.softmax(self.model(batch), dim=1)


class PhaseSampler(logging.Handler):
    """Samples this process's RSS every 50 ms, remembering the peak and the last log line before it."""

    def __init__(self) -> None:
        super().__init__()
        import psutil

        self.process = psutil.Process()
        self.phase, self.peak, self.peak_phase = "start", 0, "start"
        self.timeline: list[int] = []  # RSS once a second
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        self.phase = record.getMessage()[:80]

    def _run(self) -> None:
        ticks = 0
        while not self.stop.wait(0.05):
            rss = self.process.memory_info().rss
            ticks += 1
            if ticks % 20 == 0:
                self.timeline.append(rss)
            if rss > self.peak:
                self.peak, self.peak_phase = rss, self.phase


def run_one(slide: Path, out: Path, mpp: float, window: int, workers: int, batch_size: int) -> dict:
    """Segment one slide here and report the peaks (called in a fresh subprocess)."""
    from wsiseg.engine.run import run_slide
    from wsiseg.progress import get_logger

    predictor = TinyConvPredictor()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sampler = PhaseSampler()
    get_logger().addHandler(sampler)
    get_logger().setLevel(logging.INFO)
    started = time.perf_counter()
    summary = run_slide(slide, predictor, out, mpp=mpp, window=window, overlap=0.25,
                        batch_size=batch_size, device="cpu", workers=workers, overwrite=True, show_progress=False)
    sampler.stop.set()
    return {
        "slide": slide.name,
        "mask": f"{summary['width']}x{summary['height']}",
        "windows": summary["windows_run"],
        "seconds": round(time.perf_counter() - started, 1),
        "tiles_per_s": round(summary["tiles_per_s"], 1),
        "peak_rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_reader_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "rss_after_imports_mb": baseline,
        "peak_phase": sampler.peak_phase,
        "rss_timeline_mb": [round(v / 2**20) for v in sampler.timeline[:: max(1, len(sampler.timeline) // 12)]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsiseg-bench"))
    parser.add_argument("--mpp", type=float, default=1.0, help="segmentation MPP (slides are 0.25 MPP)")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        result = run_one(args.one, args.workdir / f"out_{args.one.stem}", args.mpp, args.window, args.workers,
                         args.batch_size)
        print(json.dumps(result))
        return

    from synthetic_slide import write_synthetic_slide

    results = []
    for width, height in SIZES:
        slide = args.workdir / f"synthetic_{width}x{height}.tif"
        if not slide.exists():
            print(f"writing {slide} ...", flush=True)
            write_synthetic_slide(slide, width, height)
        command = [sys.executable, __file__, "--one", str(slide), "--workdir", str(args.workdir),
                   "--mpp", str(args.mpp), "--window", str(args.window), "--workers", str(args.workers),
                   "--batch-size", str(args.batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    small, large = (r["peak_rss_main_mb"] for r in results)
    growth = (large - small) / small
    print(f"peak RSS (main process): {small:.0f} MB and {large:.0f} MB ({growth:+.1%} for 3x the height); "
          f"largest reader process {max(r['peak_rss_reader_mb'] for r in results):.0f} MB")
    ok = large * 1024**2 < GOAL_BYTES and abs(growth) <= 0.10
    print("goal (< 3 GB, within 10%):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
