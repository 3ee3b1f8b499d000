"""Compare the progressive and fused decoders by a short training on the labelled HGSC sample.

The 1500x1500 H&E image with its nuclei type mask (0 background, 1 connective, 2 inflammatory,
3 neoplastic) is split by columns: the left 1008 columns train, the right 480 columns
validate (spatially disjoint). Each decoder trains on the same random crops, with the same
seed and the same backbone, then is scored on the whole validation strip in one pass.

    .venv/bin/python tools/compare_decoders.py --steps 200 --model efficientnet_lite0_imagenet
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from wsiseg.metrics import confusion_matrix, metrics_from_confusion
from wsiseg.models.segmenter import build_segmenter
from wsiseg.samples import fetch_samples
from wsiseg.train.losses import cross_entropy, dice_loss

CLASSES = ["background", "connective", "inflammatory", "neoplastic"]
SPLIT = 1008


def load_sample() -> tuple[torch.Tensor, torch.Tensor]:
    """The HGSC image as (3, H, W) floats in [0, 1] and its mask as (H, W) int64."""
    samples = fetch_samples()
    image = np.array(Image.open(samples["hgsc_image"]).convert("RGB"))
    mask = np.array(Image.open(samples["hgsc_mask"]))
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255, torch.from_numpy(mask.astype(np.int64))


def batches(image: torch.Tensor, mask: torch.Tensor, steps: int, batch: int, crop: int, seed: int):
    """Random flipped crops from the training columns, identical for every decoder."""
    generator = torch.Generator().manual_seed(seed)
    height = image.shape[1]
    for _ in range(steps):
        ys = torch.randint(0, height - crop + 1, (batch,), generator=generator)
        xs = torch.randint(0, SPLIT - crop + 1, (batch,), generator=generator)
        flips = torch.rand(batch, 2, generator=generator) < 0.5
        crops, labels = [], []
        for y, x, (h, v) in zip(ys.tolist(), xs.tolist(), flips.tolist()):
            c, m = image[:, y:y + crop, x:x + crop], mask[y:y + crop, x:x + crop]
            dims = [d for d, f in ((-1, h), (-2, v)) if f]
            crops.append(c.flip(dims) if dims else c)
            labels.append(m.flip(dims) if dims else m)
        yield torch.stack(crops), torch.stack(labels)


def run(model_name: str, decoder: str, mode: str, steps: int, batch: int, crop: int, seed: int, lr: float,
        options: dict) -> dict:
    image, mask = load_sample()
    torch.manual_seed(seed)
    model = build_segmenter({"name": model_name, "decoder": decoder, "finetune_mode": mode,
                             "input_size": crop, "lora_target_modules": ["conv_pw", "conv_pwl"]
                             if model_name.startswith("efficientnet") else ["qkv", "proj"]}, len(CLASSES), **options)
    decoder_params = sum(p.numel() for p in model.decoder.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches(image, mask, steps, batch, crop, seed)):
        logits = model(x)
        loss = cross_entropy(logits, y) + dice_loss(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  {decoder} step {step:4d} loss {loss.item():.3f}", flush=True)
    train_s = time.perf_counter() - start
    model.eval()
    m = model.input_multiple
    height = image.shape[1] // m * m
    width = (image.shape[2] - SPLIT) // m * m
    with torch.no_grad():
        logits = model(image[None, :, :height, SPLIT:SPLIT + width])
    cm = confusion_matrix(logits.argmax(1)[0], mask[:height, SPLIT:SPLIT + width], len(CLASSES))
    metrics = metrics_from_confusion(cm)
    return {"decoder": decoder, "decoder_params": decoder_params, "train_s": round(train_s, 1),
            "mdice": metrics["mdice"], "dice_no_bg": metrics["dice_no_bg"], "miou": metrics["miou"],
            "per_class_dice": [round(float(v), 4) for v in metrics["per_class"]["dice"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0_imagenet")
    parser.add_argument("--mode", default="frozen")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--depth", type=int, default=None, help="ViT depth override (tiny timm ViTs)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"depth": args.depth} if args.depth else {}
    results = []
    for seed in args.seeds:
        for decoder in ("progressive", "fused"):
            result = run(args.model, decoder, args.mode, args.steps, args.batch, args.crop, seed, args.lr, options)
            result.update(seed=seed, model=args.model, mode=args.mode, steps=args.steps)
            print(json.dumps(result), flush=True)
            results.append(result)
    for decoder in ("progressive", "fused"):
        rows = [r for r in results if r["decoder"] == decoder]
        print(f"{decoder:12s} mdice {np.mean([r['mdice'] for r in rows]):.4f} "
              f"dice_no_bg {np.mean([r['dice_no_bg'] for r in rows]):.4f} miou {np.mean([r['miou'] for r in rows]):.4f} "
              f"train {np.mean([r['train_s'] for r in rows]):.0f}s params {rows[0]['decoder_params']:,}")


if __name__ == "__main__":
    main()
