"""The training loop: `train_model(config)` (and `wsiseg train`).

Output tree under `logging.output_dir`: config.yaml (the completed config), training.log,
metrics.jsonl (one JSON line per epoch), checkpoints/last.pth (written atomically at every
validation, with everything `--resume` needs) and checkpoints/best_model.pth (by
`validation.metric`), visualizations/ (validation samples: image | truth | prediction) and
training_history.png. Under torchrun with several processes it trains with DDP; rank 0 writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from wsiseg.config import dump_config, read_config
from wsiseg.config_types import Config
from wsiseg.engine.predictors import SegmenterPredictor, autocast_dtype
from wsiseg.devices import resolve_device
from wsiseg.engine.image import ImageInference, predict_image, to_tensor
from wsiseg.errors import WsisegError
from wsiseg.locks import acquire, release
from wsiseg.metrics import MetricAccumulator, format_metrics
from wsiseg.progress import get_logger, log_to_file, progress_bar
from wsiseg.train.augment import TrainTransform
from wsiseg.train.data import SegmentationDataset, split_entries
from wsiseg.train.losses import CombinedLoss
from wsiseg.train.optim import build_optimizer, lr_factor

log = get_logger("train")

HISTORY_METRICS = ("mdice", "dice_no_bg", "dice_foreground", "miou", "pixel_acc")


def accumulation_group(index: int, batches: int, accum: int) -> int:
    """How many batches share the optimiser step of batch `index` (the epoch's last group may be shorter)."""
    return min(accum, batches - index // accum * accum)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state, as tensors and plain types (loadable with weights_only)."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def parameter_groups(model: nn.Module, lr: float, backbone_lr: float | None, weight_decay: float) -> list[dict[str, Any]]:
    """Backbone and decoder groups, each split into decayed weights and undecayed norms/biases/tokens."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.") else "decoder"
        no_decay = (parameter.ndim <= 1 or name.endswith(".bias") or "norm" in name.lower()
                    or any(token in name for token in ("pos_embed", "cls_token", "reg_token", "lora_magnitude")))
        groups.setdefault((part, not no_decay), []).append(parameter)
    if not groups:
        raise WsisegError("the model has no trainable parameters: choose model.finetune_mode lora, dora or full")
    out = []
    for (part, decay), params in sorted(groups.items()):
        group_lr = backbone_lr if part == "backbone" and backbone_lr is not None else lr
        out.append({"params": params, "lr": group_lr, "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{part}{'' if decay else '_no_decay'}"})
    return out


class Distributed:
    """torchrun environment: rank, world size, and whether this process writes outputs."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return float(tensor) / self.world

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def check_images(dataset: SegmentationDataset, split: str) -> None:
    """Open every image and mask header once: unreadable files and size mismatches fail before training."""
    from PIL import Image, UnidentifiedImageError

    for entry in dataset.entries:
        sizes = {}
        for key in ("image", "mask"):
            if entry[key] is None:
                continue
            try:
                with Image.open(entry[key]) as handle:
                    sizes[key] = handle.size
            except (OSError, UnidentifiedImageError) as error:
                raise WsisegError(f"cannot read {key} {entry[key]} of split '{split}' ({error}); replace it or "
                                  "remove it from the dataset JSON") from None
        if len(sizes) == 2 and sizes["image"] != sizes["mask"]:
            (iw, ih), (mw, mh) = sizes["image"], sizes["mask"]
            raise WsisegError(f"mask {entry['mask']} is {mw}x{mh} but image {entry['image']} is {iw}x{ih}; "
                              "masks must match their images pixel for pixel")


class Trainer:
    """One training run of a completed config (see `train_model`)."""

    def __init__(self, config: dict[str, Any], device: torch.device, dist: Distributed) -> None:
        from wsiseg.models.segmenter import build_segmenter
        from wsiseg.store.masks import default_colors

        self.config = config
        self.cfg = Config.from_dict(config)
        self.device = device
        self.dist = dist
        self.out = Path(self.cfg.logging.output_dir)
        dataset, training = self.cfg.dataset, self.cfg.training
        self.num_classes = dataset.num_classes
        self.class_names = list(dataset.class_names)
        self.ignore_index = dataset.ignore_index
        self.colors = default_colors(self.num_classes)
        self.dtype = autocast_dtype(device, self.cfg.system.precision)
        transform = TrainTransform(training.crop_size, training.augmentations, self.ignore_index)
        self.train_set = SegmentationDataset(split_entries(dataset.json, "train"), self.num_classes,
                                             self.ignore_index, transform, training.repeats)
        self.val_set = SegmentationDataset(split_entries(dataset.json, "val"), self.num_classes, self.ignore_index)
        check_images(self.train_set, "train")
        check_images(self.val_set, "val")
        seed_everything(self.cfg.system.seed)
        model = build_segmenter(config["model"], self.num_classes).to(device)
        model.class_names = self.class_names
        self.model = model
        self.net: nn.Module = model
        if dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
        self.criterion = CombinedLoss(training.loss, self.num_classes, self.ignore_index)
        self.loader_generator = torch.Generator()
        self.loader = self._loader()
        self.steps_per_epoch = math.ceil(len(self.loader) / training.grad_accum)
        groups = parameter_groups(model, training.lr, training.backbone_lr, training.weight_decay)
        self.optimizer = build_optimizer(groups, training)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, training, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.best_epoch: int | None = None

    def _loader(self) -> torch.utils.data.DataLoader:
        training, system = self.cfg.training, self.cfg.system
        sampler = None
        if self.dist.enabled:
            sampler = torch.utils.data.distributed.DistributedSampler(
                self.train_set, self.dist.world, self.dist.rank, shuffle=True, seed=system.seed)
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=training.batch_size, shuffle=sampler is None, sampler=sampler,
            num_workers=system.num_workers, generator=self.loader_generator, drop_last=False,
            pin_memory=self.device.type == "cuda" and system.pin_memory is not False,  # pinning needs CUDA
            persistent_workers=False)

    def resume(self, payload: dict[str, Any]) -> None:
        """Continue from a `last.pth` payload (`read_checkpoint`, checked by `reconcile`): weights, optimiser,
        scheduler, scaler, epoch, history and RNG state."""
        from wsiseg.models.checkpoint import restore_weights

        path = payload["path"]
        state = payload.get("extra", {}).get("training")
        if state is None:
            raise WsisegError(f"{path} holds no training state (is it a best_model.pth or an export?); resume from "
                              "checkpoints/last.pth of the run")
        restore_weights(self.model, payload)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        set_rng_state(state["rng"])
        if self.dist.main:
            lines = "".join(json.dumps(record) + "\n" for record in self.history)
            (self.out / "metrics.jsonl").write_text(lines)
        log.info("resumed from %s after epoch %d of %d", path, self.epoch, self.cfg.training.epochs)

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training loader; returns mean loss, its terms, lr and speed."""
        training = self.cfg.training
        accum, clip = training.grad_accum, training.clip_grad
        self.net.train()
        if isinstance(self.loader.sampler, torch.utils.data.distributed.DistributedSampler):
            self.loader.sampler.set_epoch(epoch)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        loss_sum, images, started = 0.0, 0, time.perf_counter()
        batches = len(self.loader)
        with progress_bar(len(self.loader.sampler), f"epoch {epoch + 1}/{training.epochs}", unit="img",
                          disable=not self.dist.main, fields={"loss": ".4f", "lr": ".2e"}) as advance:
            for index, batch in enumerate(self.loader):
                image = batch["image"].to(self.device, non_blocking=True)
                mask = batch["mask"].to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                    logits = self.net(image)
                loss = self.criterion(logits.float(), mask)
                self.scaler.scale(loss / accumulation_group(index, batches, accum)).backward()
                if (index + 1) % accum == 0 or index + 1 == batches:
                    if clip:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise WsisegError(f"the training loss became {value} at epoch {epoch + 1}, batch {index + 1}: lower "
                                      "training.lr, set training.clip_grad, or use system.precision fp32/bf16")
                loss_sum += value * image.shape[0]
                images += image.shape[0]
                for name, term in self.criterion.last.items():
                    totals[name] = totals.get(name, 0.0) + term * image.shape[0]
                advance(image.shape[0], loss=loss_sum / images, lr=self.optimizer.param_groups[0]["lr"])
                if self.dist.main and (index + 1) % self.cfg.logging.log_every == 0:
                    log.debug("epoch %d batch %d/%d loss %.4f", epoch + 1, index + 1, batches, value)
        seconds = time.perf_counter() - started
        return {
            "train_loss": self.dist.mean(loss_sum / max(images, 1), self.device),
            "loss_terms": {k: v / max(images, 1) for k, v in totals.items()},
            "lr": {group["name"]: group["lr"] for group in self.optimizer.param_groups},
            "train_seconds": seconds,
            "train_images_per_s": images * self.dist.world / max(seconds, 1e-9),
        }

    def validate(self, epoch: int) -> dict[str, Any]:
        """Metrics of the validation split (one confusion matrix), and the sample panels."""
        from PIL import Image

        from wsiseg.train.plots import sample_panel

        validation = self.cfg.validation
        inference = ImageInference(validation.mode, self.cfg.model.input_size, validation.overlap, validation.blend,
                                   validation.batch_size)
        self.model.eval()
        accumulator = MetricAccumulator(self.num_classes, self.ignore_index, self.class_names)
        predict = SegmenterPredictor(self.model, self.class_names, self.colors, self.cfg.system.precision).predict
        visualization = self.cfg.visualization
        last = epoch + 1 == self.cfg.training.epochs
        shown = visualization.num_samples if (epoch + 1) % visualization.every == 0 or last else 0
        for index in range(len(self.val_set.entries)):
            image, mask = self.val_set.load(index)
            scores = predict_image(to_tensor(image, self.device), predict, inference, self.model.input_multiple)
            labels = scores.argmax(0).cpu().numpy()
            accumulator.update(labels, mask)
            if index < shown:
                panel = sample_panel(image, mask, labels, self.colors, self.cfg.visualization.alpha,
                                     self.ignore_index)
                name = f"epoch{epoch + 1:03d}_{self.val_set.name(index)}.png"
                Image.fromarray(panel).save(self.out / "visualizations" / name)
        return accumulator.compute()

    def save_last(self) -> None:
        """checkpoints/last.pth with the complete training state (atomic)."""
        from wsiseg.models.checkpoint import save_checkpoint

        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "rng": rng_state(),
        }
        save_checkpoint(self.out / "checkpoints" / "last.pth", self.model, self.config, self.class_names,
                        training=state, epoch=self.epoch)

    def run(self) -> dict[str, Any]:
        """Train from `self.epoch` to the configured number of epochs."""
        from wsiseg.models.checkpoint import save_checkpoint
        from wsiseg.train.plots import plot_history

        training, validation = self.cfg.training, self.cfg.validation
        metric = validation.metric
        seed = self.cfg.system.seed
        while self.epoch < training.epochs:
            epoch = self.epoch
            # each epoch is seeded from (seed, epoch): a resumed run draws the same crops and augmentations
            seed_everything(seed + 1000 * (epoch + 1) + self.dist.rank)
            self.loader_generator.manual_seed(seed + epoch)
            record: dict[str, Any] = {"epoch": epoch + 1, **self.train_one_epoch(epoch)}
            self.epoch = epoch + 1
            validate = self.epoch % validation.every == 0 or self.epoch == training.epochs
            if validate and self.dist.main:
                started = time.perf_counter()
                record["val"] = self.validate(epoch)
                record["val_seconds"] = time.perf_counter() - started
                value = record["val"][metric]
                improved = math.isfinite(value) and (self.best is None or value > self.best)
                if improved:
                    self.best, self.best_epoch = value, self.epoch
                self.history.append(record)
                if improved:
                    save_checkpoint(self.out / "checkpoints" / "best_model.pth", self.model, self.config,
                                    self.class_names, epoch=self.epoch, metric=metric, value=value)
                self.save_last()
                plot_history(self.history, self.out / "training_history.png",
                             tuple(dict.fromkeys((metric, *HISTORY_METRICS[:3]))))
            elif self.dist.main:
                self.history.append(record)
            if self.dist.main:
                with open(self.out / "metrics.jsonl", "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                val_text = f" | val {format_metrics(record['val'], tuple(dict.fromkeys((metric, *HISTORY_METRICS))))}" if "val" in record else ""
                log.info("epoch %d/%d loss %.4f (%s) lr %.2e %.1f img/s%s", self.epoch, training.epochs,
                         record["train_loss"], " ".join(f"{k} {v:.4f}" for k, v in record["loss_terms"].items()),
                         next(iter(record["lr"].values())), record["train_images_per_s"], val_text)
            self.dist.barrier()
        return {"output_dir": str(self.out), "metric": metric, "best": self.best, "best_epoch": self.best_epoch,
                "epochs": self.epoch, "last": self.history[-1] if self.history else None}


RUN_FILES = {"config.yaml", "training.log", "metrics.jsonl", "training_history.png", "checkpoints", "visualizations"}


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Create the output tree; refuse to train over an existing run without --resume or --overwrite.

    A folder that holds only the files of a run that stopped before its first checkpoint has nothing
    to resume: a plain rerun starts it over. Neither a best_model.pth without last.pth (the first
    validation writes best_model.pth, then last.pth) nor the temporary of a killed save is a state to resume.
    """
    from wsiseg.outputs import remove

    if out.exists() and any(out.iterdir()) and not resume and not overwrite:
        last = out / "checkpoints" / "last.pth"
        if last.is_file():
            raise WsisegError(f"output folder {out} already holds a run: pass --resume {last} to "
                              "continue it, --overwrite to replace it, or set logging.output_dir (log_dir/experiment_name)")
        names = {path.name for path in out.iterdir()}
        folder = out / "checkpoints"
        checkpoints = [path for path in folder.glob("*.pth") if path.name != "best_model.pth"
                       and not path.name.startswith(".")] if folder.is_dir() else []
        if not names <= RUN_FILES or checkpoints:
            raise WsisegError(f"output folder {out} is not empty and holds no run to resume "
                              f"({out / 'checkpoints' / 'last.pth'} is missing): pass --overwrite to replace it, "
                              "or set logging.output_dir (log_dir/experiment_name) to another folder")
        log.warning("%s holds a run that stopped before its first checkpoint: starting it over", out)
        overwrite = True
    if out.exists() and any(out.iterdir()) and not resume:
        remove(out)
    for sub in ("checkpoints", "visualizations"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def train_model(config: str | Path | dict[str, Any], resume: str | Path | None = None, device: str | None = None,
                overwrite: bool = False, options: Sequence[str] = ()) -> dict[str, Any]:
    """Train a segmenter from a YAML config (path or raw mapping, either dialect); returns a summary of the run.

    `resume` continues a run from its checkpoints/last.pth (or the run folder holding it);
    `device` overrides system.device;
    `options` are `key.path=value` overrides (values parsed as YAML) applied before validation.
    """
    from wsiseg.config import apply_options, check_config

    if isinstance(config, dict):
        config, reference_keys = check_config(apply_options(copy.deepcopy(config), options), source="config")
    else:
        config, reference_keys = read_config(config, options=options)
    if device is not None:
        config["system"]["device"] = device
    resumed = None
    if resume is not None:
        from wsiseg.models.checkpoint import read_checkpoint, reconcile

        resume = Path(resume)
        if resume.is_dir():
            resume = resume / "checkpoints" / "last.pth" if (resume / "checkpoints").is_dir() else resume / "last.pth"
        resumed = read_checkpoint(resume)
        reconcile(resumed, config)
    dist = Distributed()
    lock = None
    try:
        chosen = resolve_device(config["system"]["device"])
        if dist.enabled and chosen.type == "cuda":
            chosen = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(chosen)
        if config["system"]["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        out = Path(config["logging"]["output_dir"])
        config["logging"]["output_dir"] = str(out)
        if dist.main:
            lock = acquire(out, "train", inside=False)  # beside: an empty folder stays empty
            prepare_output(out, resume is not None, overwrite)
        dist.barrier()
        with log_to_file(out / "training.log") if dist.main else contextlib.nullcontext():
            if dist.main:
                dump_config(config, out / "config.yaml")
                if reference_keys:
                    log.info("reference config keys read as: %s", "; ".join(reference_keys))
                log.info("training %s on %s (%s) -> %s", config["model"]["name"], chosen,
                         str(autocast_dtype(chosen, config["system"]["precision"]) or "fp32").replace("torch.", ""), out)
            trainer = Trainer(config, chosen, dist)
            if resumed is not None:
                trainer.resume(resumed)
            summary = trainer.run()
            if dist.main:
                log.info("done: best %s %.4f at epoch %s; checkpoints in %s", summary["metric"],
                         summary["best"] if summary["best"] is not None else float("nan"), summary["best_epoch"],
                         out / "checkpoints")
            return summary
    finally:
        release(lock)
        dist.close()

