"""How long a user waits for each common mistake's one-line error, against `wsiseg --help` (start-up alone).

Goal: every error within a second (checked before torch, a model or a cluster is loaded). Each
case runs as a user runs it, a fresh `python -m wsiseg` process, interleaved with the baseline;
the median of --repeats runs counts.

    .venv/bin/python tools/bench_errors.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def timed(args: list[str]) -> tuple[float, str]:
    """Seconds and the last stderr line of `python -m wsiseg ARGS`."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "wsiseg", *args], capture_output=True, text=True, timeout=600)
    lines = (result.stderr or result.stdout).strip().splitlines()
    return time.perf_counter() - started, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(root / "patch.png")
        (root / "ck.pth").write_bytes(b"not read before the slide is checked")
        cases = {
            "segment missing.svs --checkpoint ck.pth": ["segment", str(root / "missing.svs"), "--checkpoint",
                                                       str(root / "ck.pth"), "--out", str(root / "a")],
            "segment patch.png (no MPP)": ["segment", str(root / "patch.png"), "--checkpoint", str(root / "ck.pth"),
                                           "--out", str(root / "b")],
            "segment --tissue nonsense": ["segment", str(root / "patch.png"), "--slide-mpp", "0.5", "--checkpoint",
                                          str(root / "ck.pth"), "--out", str(root / "c"), "--tissue", "nonsense"],
            "fseg --model uni_v1 (no --weights)": ["fseg", str(root / "patch.png"), "--slide-mpp", "0.5", "--model",
                                                   "uni_v1", "--out", str(root / "d")],
            "fseg missing.svs": ["fseg", str(root / "missing.svs"), "--out", str(root / "e")],
            "tile --tissue missing.geojson": ["tile", str(root / "patch.png"), "--mpp", "0.5", "--out",
                                              str(root / "f"), "--tissue", str(root / "missing.geojson")],
        }
        times: dict[str, list[float]] = {"wsiseg --help (start-up)": [], **{name: [] for name in cases}}
        messages: dict[str, str] = {}
        for _ in range(args.repeats):
            for name, case in cases.items():
                times["wsiseg --help (start-up)"].append(timed(["--help"])[0])
                seconds, messages[name] = timed(case)
                times[name].append(seconds)
        print("| command | median s | error |\n|---|---|---|")
        for name, values in times.items():
            print(f"| {name} | {statistics.median(values):.2f} | {messages.get(name, '-')[:110]} |")


if __name__ == "__main__":
    main()
