"""Independent implementations used as test oracles: downloaded once with `pip download --no-deps`, never installed.

They pin old dependencies, so their files are unpacked into a cache folder that the tests put on
`sys.path` only while importing them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ORACLES = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wsiseg-test-oracles"


def oracle_site(name: str, downloads: Sequence[Sequence[str]], arrange: Callable[[Path, Path], None]) -> Path:
    """The cache folder of oracle `name`, made once: each `downloads` entry is the arguments of one
    `pip download --no-deps`; `arrange(scratch, site)` unpacks the downloaded files from scratch into site.
    """
    target = ORACLES / name
    if (target / "complete").is_file():
        return target
    scratch = ORACLES / f".partial-{name}-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        for args in downloads:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(scratch), *args],
                           check=True, capture_output=True, timeout=300)
        site = scratch / "site"
        site.mkdir()
        arrange(scratch, site)
        (site / "complete").write_text(f"{name}: {downloads}\n")
        try:
            site.rename(target)
        except OSError:  # another test process finished first
            pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
