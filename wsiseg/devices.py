"""Choosing the torch device: one rule for training, inference, segmentation and F-Seg."""

from __future__ import annotations

from typing import Any

from wsiseg.errors import WsisegError


def resolve_device(device: str | None = "auto") -> Any:
    """A torch device from auto / cpu / cuda / cuda:N; `auto` picks CUDA when present.

    An unknown name, or CUDA asked for where there is none, is a user error.
    """
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise WsisegError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise WsisegError(f"device {device} was asked for but no CUDA GPU is available: use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise WsisegError(
            f"device {device} does not exist: this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
            f"(cuda:0 to cuda:{count - 1}); use one of those or --device cuda"
        )
    return resolved
