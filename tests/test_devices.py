"""Device choice: auto, cpu, cuda and cuda:N, with user errors for devices that are not there."""

from __future__ import annotations

import pytest
import torch

from wsiseg.devices import resolve_device
from wsiseg.errors import WsisegError


def test_cpu_and_unknown_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(WsisegError, match="unknown device 'gpu7'"):
        resolve_device("gpu7")


def test_gpu_index_beyond_the_machine_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(WsisegError, match=r"cuda:7 does not exist: this machine has 1 CUDA GPU \(cuda:0 to cuda:0\)"):
        resolve_device("cuda:7")


def test_cuda_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(WsisegError, match="no CUDA GPU is available"):
        resolve_device("cuda:0")
