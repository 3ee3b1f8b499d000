"""The model a process loaded last is reused for an equal request, and replaced for any other."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from wsiseg import model_cache
from wsiseg.model_cache import file_stamp, last_loaded


def test_equal_requests_share_one_load_and_another_replaces_it(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_cache, "_LAST", {})
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one")
    loads: list[str] = []

    def load(name: str) -> object:
        loads.append(name)
        return object()

    first = last_loaded(["m", file_stamp(weights)], lambda: load("m"))
    assert last_loaded(["m", file_stamp(weights)], lambda: load("m")) is first and loads == ["m"]
    other = last_loaded(["n", file_stamp(weights)], lambda: load("n"))
    assert other is not first and len(model_cache._LAST) == 1  # one model held at a time
    assert last_loaded(["m", file_stamp(weights)], lambda: load("m")) is not first and loads == ["m", "n", "m"]
    weights.write_bytes(b"two")  # the user replaced the file: loaded again
    os.utime(weights, ns=(1, 1))
    last_loaded(["m", file_stamp(weights)], lambda: load("m"))
    assert loads == ["m", "n", "m", "m"]
    assert file_stamp(None) is None and file_stamp(tmp_path / "missing")[1] is None
