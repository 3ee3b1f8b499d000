"""Shared fixtures: the real sample material, fetched once into the cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsiseg.samples import fetch_samples


@pytest.fixture(scope="session", autouse=True)
def samples() -> dict[str, Path]:
    """Paths of the real sample material, fetched once per test process before any test.

    Autouse: run time never downloads (efficientnet_lite0_imagenet reads its weights from the cache
    only), so on a fresh machine the cache must be filled before the first test builds a backbone.
    """
    return fetch_samples()


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m wsiseg ARGS` in a subprocess, as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "wsiseg", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=900
    )


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """A user error: exit status 2, one 'Error:' line naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.stderr
    for word in words:
        assert word.lower() in error_lines[0].lower(), (word, error_lines[0])
