"""Benchmark F-Seg: projection tokens/s against scipy, and end-to-end fseg tiles/s against segment.

    python tools/bench_fseg.py [--device auto] [--out bench_fseg.json] [--skip-e2e]

1. Projection: real EfficientNet-Lite0 tokens of the CMU sample slide onto k-means banks
   (k = 8, 32, 64): wsiseg's batched NNLS on the device vs scipy.optimize.nnls per token,
   with the largest weight difference. On the CPU both run on one thread and are timed in
   process CPU time (fair on a shared machine); on a GPU, wall time after synchronising.
2. End to end on the CMU slide: `fseg` (projection predictor) vs `segment` (a segmenter with
   the same backbone and an untrained fused decoder: speed only) through the same engine,
   same MPP, window, overlap and batch size; tiles/s from each run's summary.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def projection(device: str, repeats: int = 3) -> list[dict]:
    import torch
    from scipy.optimize import nnls

    from wsiseg.fseg.features import load_extractor
    from wsiseg.fseg.kmeans import multi_kmeans
    from wsiseg.fseg.nnls import project
    from wsiseg.samples import fetch_samples
    from wsiseg.slide import open_slide

    cpu = not device.startswith("cuda")
    clock = time.process_time if cpu else time.perf_counter
    extractor = load_extractor(device=device)
    with open_slide(fetch_samples()["cmu_svs"]) as slide:
        corners = [(x, y) for y in range(1200, 2700, 512) for x in range(200, 1300, 512)]
        pixels = np.stack([slide.read(x, y, 512, 512, 0.5) for x, y in corners])
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    features = extractor(batch)
    tokens = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    fit_on, test = tokens[::2].contiguous(), tokens[1::2].contiguous()
    rows = []
    threads = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)
    for k in (8, 32, 64):
        bank = multi_kmeans(fit_on, [k], seed=0)[k]
        project(test[:256], bank)  # warm-up
        if test.device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        for _ in range(repeats):
            weights = project(test, bank)
        if test.device.type == "cuda":
            torch.cuda.synchronize()
        ours = repeats * test.shape[0] / (clock() - start)
        a, c = test.cpu().double().numpy(), bank.cpu().double().numpy().T
        sample = a[:2000]
        start = time.process_time()
        expected = np.stack([nnls(c, t)[0] for t in sample])
        reference = sample.shape[0] / (time.process_time() - start)
        diff = float(np.abs(weights[: sample.shape[0]].cpu().numpy() - expected).max())
        rows.append({"k": k, "tokens": int(test.shape[0]), "dim": int(test.shape[1]), "device": str(test.device),
                     "timer": "process CPU time, 1 thread" if cpu else "wall time",
                     "wsiseg_tokens_per_s": round(ours, 1), "scipy_tokens_per_s": round(reference, 1),
                     "speedup": round(ours / reference, 1), "max_abs_diff": diff,
                     "zero_fraction": float((expected == 0).mean())})
        print(json.dumps(rows[-1]))
    torch.set_num_threads(threads)
    return rows


def end_to_end(device: str, k: int = 8, mpp: float = 0.5, window: int = 512, batch_size: int = 8) -> dict:
    import wsiseg
    from wsiseg.engine.predictors import SegmenterPredictor
    from wsiseg.engine.run import run_slide
    from wsiseg.models.segmenter import build_segmenter
    from wsiseg.slide import open_slide

    slide_path = wsiseg.fetch_samples()["cmu_svs"]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        bank = Path(folder) / "bank.safetensors"
        wsiseg.fit_concepts(slide_path, bank, ks=[k], mpp=mpp, window=window, device=device)
        summary = wsiseg.fseg_slide(slide_path, Path(folder) / "fseg", k=k, bank=bank, mpp=mpp, window=window,
                                    batch_size=batch_size, device=device)[0]
        results["fseg"] = {"tiles_per_s": summary["tiles_per_s"], "windows": summary["windows_run"],
                           "timings": summary["timings"]}
        from wsiseg.devices import resolve_device

        resolved = resolve_device(device)
        model = build_segmenter({"name": "efficientnet_lite0_imagenet", "decoder": "fused", "finetune_mode": "frozen",
                                 "input_size": window}, k + 1).eval().to(resolved)
        predictor = SegmenterPredictor(model, ["background"] + [f"class {i}" for i in range(k)])
        summary = run_slide(open_slide(slide_path), predictor, Path(folder) / "segment", mpp=mpp, window=window,
                            batch_size=batch_size, device=str(resolved))
        results["segment"] = {"tiles_per_s": summary["tiles_per_s"], "windows": summary["windows_run"],
                              "timings": summary["timings"]}
    results["fseg_over_segment"] = round(results["fseg"]["tiles_per_s"] / results["segment"]["tiles_per_s"], 3)
    print(json.dumps(results))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="Write the figures as JSON here.")
    parser.add_argument("--skip-e2e", action="store_true", help="Only the projection benchmark.")
    args = parser.parse_args()
    import torch

    from wsiseg.devices import resolve_device

    device = str(resolve_device(args.device))
    report = {"device": device, "torch_threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
              "projection": projection(device)}
    if not args.skip_e2e:
        report["end_to_end"] = end_to_end(device)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
