"""End-to-end segmentation throughput against the bare model forward, in the same run.

On CUDA (default there): a uni_v1-shaped ViT-L/16 (random weights) with the fused decoder at
512 px, bf16 autocast, on a synthetic slide file read by OpenSlide at its own 0.5 MPP. It
reports the tiles/s of the engine (`run_slide`: reader processes, pinned copies, model,
streaming blend, mask writing) and of the bare forward on random tensors already on the GPU.
Goal: the engine at >= 90% of the bare forward.
Without CUDA it runs as a smoke check with a tiny ViT on a small slide (figures meaningless).

    .venv/bin/python tools/bench_segment_gpu.py [--model uni_v1] [--size 512] [--batch-size 32] [--workers 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def bare_forward(predictor, batch_size: int, size: int, device, seconds: float = 10.0) -> float:  # type: ignore[no-untyped-def]
    """Tiles/s of predictor.predict on random tensors already on the device."""
    import torch

    batch = torch.rand(batch_size, 3, size, size, device=device)
    for _ in range(2):  # warm-up (autotuning, allocator)
        predictor.predict(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or count < 3 * batch_size:
        predictor.predict(batch)
        count += batch_size
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def main() -> None:
    import torch

    from synthetic_slide import write_synthetic_slide
    from wsiseg.engine.predictors import SegmenterPredictor
    from wsiseg.engine.run import run_slide
    from wsiseg.models.segmenter import build_segmenter

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="uni_v1" if cuda else "timm:test_vit")
    parser.add_argument("--size", type=int, default=512 if cuda else 64)
    parser.add_argument("--batch-size", type=int, default=32 if cuda else 8)
    parser.add_argument("--workers", type=int, default=8 if cuda else 1)
    parser.add_argument("--slide-side", type=int, default=24_576 if cuda else 2_048)
    parser.add_argument("--mpp", type=float, default=0.5 if cuda else 2.0, help="segmentation MPP (slide: 0.5)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsiseg-bench"))
    parser.add_argument("--seconds", type=float, default=10.0 if cuda else 2.0, help="duration of the bare forward")
    args = parser.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    slide = args.workdir / f"synthetic_{args.slide_side}_0.5mpp.tif"
    if not slide.exists():
        write_synthetic_slide(slide, args.slide_side, args.slide_side, mpp=0.5)
    torch.manual_seed(0)
    model_cfg = {"name": args.model, "finetune_mode": "frozen", "input_size": args.size, "decoder": "fused"}
    model = build_segmenter(model_cfg, 4).to(device).eval()
    predictor = SegmenterPredictor(model, ["background", "a", "b", "c"], precision="auto")

    bare = bare_forward(predictor, args.batch_size, args.size, device, args.seconds)
    summary = run_slide(slide, predictor, args.workdir / "gpu_out", mpp=args.mpp, window=args.size, overlap=0.25,
                        batch_size=args.batch_size, device=str(device), workers=args.workers, overwrite=True,
                        exports=("tiff",), show_progress=False)
    engine = summary["tiles_per_s"]
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke check only)",
        "model": args.model, "size": args.size, "batch_size": args.batch_size, "workers": args.workers,
        "windows": summary["windows_run"], "bare_forward_tiles_per_s": round(bare, 1),
        "engine_tiles_per_s": round(engine, 1), "engine_vs_bare": round(engine / bare, 3),
        "timings": summary["timings"],
    }
    print(json.dumps(result, indent=2))
    if cuda:
        print("goal (engine >= 90% of bare forward):", "met" if engine >= 0.9 * bare else "NOT met")


if __name__ == "__main__":
    main()
