"""Time `wsiseg export --format geojson` (`write_geojson`) and its peak memory on one mask store.

    python tools/bench_geojson.py                       # the demo's CMU mask if `make demo` ran, else a synthetic one
    python tools/bench_geojson.py --store mask.zarr --level 1 --simplify 0.5 --min-area 20 --out out.geojson
    python tools/bench_geojson.py --profile 25          # plus the 25 costliest functions (cProfile, cumulative)

The export runs in a fresh interpreter (spawned), so its peak RSS is its own: `peak MB` is that
process's peak resident memory, `over start MB` how far the call raised it above its peak before
the call (interpreter, imports, the opened store; 0 for exports lighter than those). Prints seconds (wall clock, and CPU: steadier on a busy
machine), both peaks, features and vertices (ring coordinates, closing ones included). The code
measured is the `wsiseg` that Python imports (set PYTHONPATH to measure another checkout).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEMO_MASK = ROOT / "demo_output" / "segment" / "cmu_svs" / "mask.zarr"  # what `make demo` writes


def synthetic_labels(size: int, seed: int) -> np.ndarray:
    """A (size, size) label image: background, tissue (class 1) and small round nuclei of classes 2 and 3 in it."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)

    def smooth(sigma: float) -> np.ndarray:
        return ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)

    tissue, kind, blobs = smooth(24), smooth(40), smooth(2.5)
    inside = tissue > np.quantile(tissue, 0.3)
    nuclei = inside & (blobs > np.quantile(blobs, 0.9))  # ~20k blobs of a few to ~100 px on 3000 x 3000
    labels = inside.astype(np.uint8)
    labels[nuclei] = np.where(kind[nuclei] > 0, 2, 3)
    return labels


def synthetic_store(path: Path, size: int, seed: int) -> Path:
    """A finished mask store of `synthetic_labels` at 0.5 µm per pixel."""
    from wsiseg.slide.grid import Frame
    from wsiseg.store.masks import MaskStore

    labels = synthetic_labels(size, seed)
    store = MaskStore.create(path, Frame(size, size, 0.5, 0.25, (0, 0)),
                             class_names=["background", "tissue", "nucleus a", "nucleus b"])
    store.write_rows(0, labels)
    store.finish()
    return path


def _vertices(path: Path) -> tuple[int, int]:
    """(features, ring coordinates) of a written GeoJSON."""
    features = json.loads(path.read_text())["features"]
    rings = [ring for feature in features for ring in feature["geometry"]["coordinates"]]
    return len(features), sum(len(ring) for ring in rings)


def measure(store_path: str, output: str, options: dict[str, Any], profile: int) -> dict[str, Any]:
    """Write the GeoJSON of `store_path` to `output` with `options`: seconds and peak RSS (run in a fresh process)."""
    from wsiseg.export.geojson import write_geojson
    from wsiseg.store.masks import MaskStore

    store = MaskStore.open(Path(store_path))
    start_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    began, began_cpu = time.perf_counter(), time.process_time()
    write_geojson(store, Path(output), **options)
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - began_cpu
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(profile)
        sys.stdout.flush()
    return {"seconds": round(seconds, 3), "cpu seconds": round(cpu_seconds, 3), "peak MB": round(peak_mb, 1),
            "over start MB": round(peak_mb - start_mb, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="mask.zarr to export (default: the demo's, else a synthetic one)")
    parser.add_argument("--synthetic", action="store_true", help="use the synthetic mask even if the demo's exists")
    parser.add_argument("--size", type=int, default=3000, help="synthetic mask side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", type=int, default=None)
    parser.add_argument("--simplify", type=float, default=0.0, help="µm")
    parser.add_argument("--min-area", type=float, default=0.0, help="µm²")
    parser.add_argument("--out", type=Path, help="keep the GeoJSON here (default: a temporary file)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest functions")
    args = parser.parse_args(argv)
    options = {"level": args.level, "simplify": args.simplify, "min_area": args.min_area}
    with tempfile.TemporaryDirectory() as scratch:
        store = args.store or (DEMO_MASK if DEMO_MASK.is_dir() and not args.synthetic else None)
        name = str(store) if store else f"synthetic {args.size} px, seed {args.seed}"
        store = store or synthetic_store(Path(scratch) / "mask.zarr", args.size, args.seed)
        output = args.out or Path(scratch) / "mask.geojson"
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            result = pool.submit(measure, str(store), str(output), options, args.profile).result()
        features, vertices = _vertices(output)
    print(json.dumps({"store": name, **options, **result, "features": features, "vertices": vertices}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
