"""Preflight checks before a long run: libraries, codecs, devices, cache, disk, and a config's weights."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

MIN_FREE_DISK_GB = 5.0


@dataclass(frozen=True)
class Check:
    """One preflight result; `fix` says what to do when it failed."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


def check_torch() -> list[Check]:
    """torch itself, CUDA and each GPU's free memory."""
    import torch

    checks = [Check("torch", True, f"{torch.__version__}")]
    if not torch.cuda.is_available():
        checks.append(Check("cuda", True, "no CUDA device: running on the CPU (slow for real PFMs)"))
        return checks
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        checks.append(Check(f"gpu {index}", True, f"{name}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"))
    bf16 = torch.cuda.is_bf16_supported()
    checks.append(Check("bf16", True, "supported" if bf16 else "not supported: fp16 autocast with loss scaling"))
    return checks


def check_openslide() -> Check:
    """The OpenSlide library (from openslide-bin) loads."""
    try:
        import openslide
    except (ImportError, OSError) as error:
        return Check("openslide", False, str(error), "pip install openslide-bin openslide-python")
    return Check("openslide", True, f"library {openslide.__library_version__}, python {openslide.__version__}")


def check_codecs() -> Check:
    """tifffile can decode JPEG tiles and write zstd/deflate through imagecodecs."""
    try:
        import imagecodecs
    except ImportError as error:
        return Check("codecs", False, str(error), "pip install imagecodecs")
    missing = [name for name in ("jpeg8", "zstd", "zlib", "lzw") if not getattr(imagecodecs, name.upper()).available]
    if missing:
        return Check("codecs", False, f"missing: {', '.join(missing)}", "pip install --force-reinstall imagecodecs")
    return Check("codecs", True, f"imagecodecs {imagecodecs.__version__}: jpeg, zstd, deflate, lzw")


def check_cache() -> Check:
    """Whether the sample material is already in the cache (needed by the demo and the tests)."""
    from wsiseg.samples import FILES, cache_dir

    root = cache_dir()
    present = sum((root / key).exists() or any(root.glob(f"{key}.*")) for key in FILES if "/" not in key)
    total = sum("/" not in key for key in FILES)
    if present < total:
        return Check("sample cache", True, f"{root}: {present} of {total} samples; `wsiseg samples` fetches the rest")
    return Check("sample cache", True, f"{root}: all {total} samples present")


def check_disk(path: Path) -> Check:
    """Free space where outputs go."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    free_gb = shutil.disk_usage(path).free / 2**30
    ok = free_gb >= MIN_FREE_DISK_GB
    return Check("disk", ok, f"{free_gb:.1f} GiB free at {path}", "" if ok else "free space or choose another --out")


def check_config(path: Path) -> list[Check]:
    """The config validates, and its backbone weights exist and fit the architecture."""
    from wsiseg.config import load_config
    from wsiseg.errors import WsisegError
    from wsiseg.models.registry import load_backbone_weights

    try:
        config = load_config(path, splits=(), check_files=True)
    except WsisegError as error:
        return [Check("config", False, str(error), "fix the config as the message says")]
    checks = [Check("config", True, f"{path} is valid")]
    model = config["model"]
    weights = model.get("pfm_weights_path")
    if weights is None:
        checks.append(Check("weights", True, f"{model['name']}: none given (random or built-in initialisation)"))
        return checks
    try:
        load_backbone_weights(model["name"], Path(weights), device="cpu")
    except WsisegError as error:
        return [*checks, Check("weights", False, str(error), "point model.pfm_weights_path to the right file")]
    checks.append(Check("weights", True, f"{weights} fits {model['name']}"))
    return checks


def run_checks(config: Path | None = None, out: Path = Path(".")) -> list[Check]:
    """Every preflight check, plus the weights of `config` when given."""
    checks = [*check_torch(), check_openslide(), check_codecs(), check_cache(), check_disk(out)]
    if config is not None:
        checks.extend(check_config(Path(config)))
    return checks
