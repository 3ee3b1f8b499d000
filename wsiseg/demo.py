"""The main job on the built-in sample data: every stage of wsiseg, end to end, on real material.

Stages: fetch the samples; tissue-mask and tile the CMU slide into a zarr store (QC picture);
train a small segmenter on the labelled hgsc sample (configs/demo.yaml); score it on the
held-out test tiles; segment the CMU slide and its multi-level TIFF twin; run F-Seg with k=8.
Each stage writes under OUT and is skipped when its output is already complete, so an
interrupted demo resumes; `overwrite` redoes everything.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsiseg.errors import WsisegError
from wsiseg.progress import get_logger, log_to_file

log = get_logger("demo")
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
DEMO_MPP = 0.5
FSEG_K = 8


@dataclass
class DemoReport:
    """What the demo did: one line per stage and the outputs it wrote."""

    out: Path
    stages: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, seconds: float, reused: bool, outputs: dict[str, Path], figures: dict[str, Any]) -> None:
        self.stages.append({
            "stage": name, "seconds": round(seconds, 1), "reused": reused,
            "outputs": {key: str(path) for key, path in outputs.items()}, "figures": figures,
        })

    def as_text(self) -> str:
        lines = [f"wsiseg demo: outputs in {self.out}"]
        for stage in self.stages:
            how = "reused" if stage["reused"] else f"{stage['seconds']:.1f} s"
            figures = ", ".join(f"{key} {value}" for key, value in stage["figures"].items())
            lines.append(f"- {stage['stage']} ({how}){': ' + figures if figures else ''}")
            lines.extend(f"    {key}: {path}" for key, path in stage["outputs"].items())
        return "\n".join(lines)


def _demo_config(out: Path, device: str) -> dict[str, Any]:
    """configs/demo.yaml with its output folder moved under the demo's."""
    if not DEMO_CONFIG.exists():
        raise WsisegError(f"the demo config {DEMO_CONFIG} is missing: run the demo from a wsiseg source checkout")
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["logging"]["output_dir"] = str(out / "train")
    config["system"]["device"] = device
    return config


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _stage(report: DemoReport, name: str, done: Path, overwrite: bool, run: Any) -> Any:
    """Run one stage unless its completion path exists (and `overwrite` is off); record it."""
    started = time.perf_counter()
    reused = done.exists() and not overwrite
    if reused:
        log.info("%s: reusing %s", name, done)
        outputs, figures = run(reuse=True)
    else:
        log.info("%s ...", name)
        outputs, figures = run(reuse=False)
    report.add(name, time.perf_counter() - started, reused, outputs, {k: _round(v) for k, v in figures.items()})
    return outputs


def run_demo(out: str | Path = "demo_output", device: str = "auto", overwrite: bool = False) -> DemoReport:
    """Run every stage of wsiseg on the built-in samples under `out`; returns the report."""
    import wsiseg

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = DemoReport(out)
    with log_to_file(out / "demo.log"):
        started = time.perf_counter()
        samples = wsiseg.fetch_samples()
        used = ("cmu_svs", "cmu_pyramid_tiff", "hgsc_image", "hgsc_mask", "efficientnet_lite0_pth")
        report.add("fetch samples", time.perf_counter() - started, False, {key: samples[key] for key in used}, {})
        slides = {"cmu_svs": samples["cmu_svs"], "cmu_pyramid": samples["cmu_pyramid_tiff"]}

        def tile(reuse: bool) -> tuple[dict[str, Path], dict[str, Any]]:
            store = wsiseg.TileStore.open(out / "tiles" / "cmu_svs.zarr") if reuse else wsiseg.tile_slide(
                slides["cmu_svs"], out / "tiles" / "cmu_svs.zarr", DEMO_MPP, workers=2, overwrite=overwrite
            )
            tiles = len(store.tissue_tiles())
            return {"tile store": store.path, "QC picture": store.qc_picture}, {"tissue tiles": tiles}

        _stage(report, "tile the CMU slide at 0.5 MPP", out / "tiles" / "cmu_svs.zarr", overwrite, tile)

        checkpoint = out / "train" / "checkpoints" / "best_model.pth"

        def train(reuse: bool) -> tuple[dict[str, Path], dict[str, Any]]:
            if not reuse:
                summary = wsiseg.train_model(_demo_config(out, device), overwrite=overwrite)
                best = {summary["metric"]: summary["best"], "best epoch": summary["best_epoch"]}
            else:
                best = {}
            return {"run": out / "train", "checkpoint": checkpoint,
                    "history": out / "train" / "training_history.png"}, best

        _stage(report, "train the demo segmenter", checkpoint, overwrite, train)

        metrics_path = out / "heldout" / "metrics.json"

        def heldout(reuse: bool) -> tuple[dict[str, Path], dict[str, Any]]:
            if not reuse:
                dataset = yaml.safe_load((out / "train" / "config.yaml").read_text())["dataset"]["json"]
                wsiseg.infer_images(None, checkpoint, dataset, out / "heldout", device=device, overwrite=overwrite)
            metrics = json.loads(metrics_path.read_text())
            figures = {key: metrics[key] for key in ("mdice", "dice_no_bg", "miou", "pixel_acc") if key in metrics}
            return {"masks": out / "heldout" / "predictions_masks", "metrics": metrics_path}, figures

        _stage(report, "score the segmenter on held-out tiles", metrics_path, overwrite, heldout)

        for name, path in slides.items():
            folder = out / "segment" / name

            def segment(reuse: bool, path: Path = path, folder: Path = folder) -> tuple[dict[str, Path], dict[str, Any]]:
                if not reuse:
                    wsiseg.segment_slide(path, checkpoint, folder, device=device, overwrite=overwrite)
                return _engine_outputs(folder)

            _stage(report, f"segment {path.name}", folder / "summary.json", overwrite, segment)

        folder = out / "fseg" / "cmu_svs"

        def fseg(reuse: bool) -> tuple[dict[str, Path], dict[str, Any]]:
            if not reuse:
                wsiseg.fseg_slide(slides["cmu_svs"], folder, k=FSEG_K, device=device, overwrite=overwrite)
            return _engine_outputs(folder)

        _stage(report, f"F-Seg of {slides['cmu_svs'].name} with k={FSEG_K}", folder / "summary.json", overwrite, fseg)
        (out / "report.json").write_text(json.dumps(report.stages, indent=2))
        (out / "report.txt").write_text(report.as_text() + "\n")
    return report


def _engine_outputs(folder: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """The viewer files of a segment/fseg folder and the figures of its summary."""
    summary = json.loads((folder / "summary.json").read_text())
    outputs = {name: folder / name for name in ("mask.zarr", "mask.tif", "mask.ome.tif", "overlay.png")
               if (folder / name).exists()}
    figures = {"windows": summary["windows_run"], "windows/s": summary["tiles_per_s"],
               "seconds": summary["timings"]["total_s"]}
    return outputs, figures
