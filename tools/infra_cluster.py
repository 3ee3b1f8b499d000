"""Two slides on a real 2-worker dask cluster against the same two slides locally: `wsiseg segment` wall time.

The cluster is started as users start one (`dask scheduler`, and `dask worker --nworkers 1 --nthreads 1
--resources GPU=1` under its nanny, twice; tests/real_cluster.py). The model is the demo's
EfficientNet-Lite0 segmenter (ImageNet backbone from the sample cache, untrained decoder), windows of
256 px at --mpp over the two real CMU slides (the .svs and its pyramidal TIFF). Each side runs the CLI as
a user would, --repeats times, alternating; the best time counts (the machine may be shared).
The cluster start-up is reported apart. Outputs of both sides are checked equal.

    PYTHONPATH=. .venv/bin/python tools/infra_cluster.py --mpp 1.0 --repeats 2
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.real_cluster import real_cluster
from wsiseg.samples import fetch_samples
from wsiseg.store.masks import MaskStore

CLASSES = ["background", "connective", "inflammatory", "neoplastic"]


def make_checkpoint(folder: Path, mpp: float) -> Path:
    import torch

    from wsiseg.models.checkpoint import save_checkpoint
    from wsiseg.models.segmenter import build_segmenter

    torch.manual_seed(0)
    config = {
        "dataset": {"json": "unused.json", "num_classes": 4, "class_names": CLASSES, "mpp": mpp},
        "model": {"name": "efficientnet_lite0_imagenet", "decoder": "fused", "finetune_mode": "full", "input_size": 256},
    }
    path = folder / "demo_like.pth"
    save_checkpoint(path, build_segmenter(config["model"], len(CLASSES)), config, CLASSES)
    return path


def segment(slides: list[Path], checkpoint: Path, out: Path, *extra: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "wsiseg", "segment", *map(str, slides), "--checkpoint",
                             str(checkpoint), "--out", str(out), "--export", "tiff", "--device", "cpu", *extra],
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(result.stderr)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mpp", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    samples = fetch_samples()
    slides = [samples["cmu_svs"], samples["cmu_pyramid_tiff"]]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = make_checkpoint(root, args.mpp)
        started = time.perf_counter()
        with real_cluster(root / "cluster", workers=2) as address:
            startup = time.perf_counter() - started
            best = {"local": float("inf"), "cluster": float("inf")}
            for _ in range(args.repeats):
                best["local"] = min(best["local"], segment(slides, checkpoint, root / "local"))
                best["cluster"] = min(best["cluster"], segment(slides, checkpoint, root / "remote", "--scheduler", address))
        for name in ("cmu_svs", "cmu_pyramid"):
            local = MaskStore.open(root / "local" / name / "mask.zarr").level(0)[:]
            remote = MaskStore.open(root / "remote" / name / "mask.zarr").level(0)[:]
            assert np.array_equal(local, remote), name
    print(f"2 CMU slides at {args.mpp:g} MPP, EfficientNet-Lite0 segmenter, 256 px windows, CPU")
    print(f"cluster start-up (scheduler + 2 workers ready): {startup:.1f} s")
    print(f"local (one process, slides in turn): {best['local']:.1f} s")
    print(f"real cluster, 2 workers (a slide each): {best['cluster']:.1f} s  ({best['local'] / best['cluster']:.2f}x)")


if __name__ == "__main__":
    main()
