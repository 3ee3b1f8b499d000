"""Shared fixtures: the real sample material, fetched once into the cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsiseg.samples import cache_dir, fetch_samples


@pytest.fixture(scope="session")
def samples() -> dict[str, Path]:
    """Paths of the real sample material, fetched once per test process by the tests that ask for it."""
    return fetch_samples()


@pytest.fixture(scope="session")
def sample_cache(samples: dict[str, Path]) -> Path:
    """The filled sample cache, for tests that need it without its paths: run time never downloads, so
    efficientnet_lite0_imagenet built with its default weights reads them from the cache."""
    return cache_dir()


@pytest.fixture(scope="session")
def _empty_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("empty_sample_cache")


@pytest.fixture(autouse=True)
def _cache_only_where_asked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that asks for neither `samples` nor `sample_cache` sees an empty sample cache (its
    subprocesses too), as on a fresh machine before anything fetched: a test that needs the cache
    without asking fails at once instead of passing only after another test filled it."""
    if "samples" not in request.fixturenames:
        monkeypatch.setenv("WSISEG_CACHE", str(request.getfixturevalue("_empty_cache")))


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
