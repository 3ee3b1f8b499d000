"""Run every `wsiseg ...` example of the README, as written, in a scratch folder (by hand; slow).

The scratch folder links `configs/`, `docs/` (example inputs) and the demo's outputs (`demo_output/`, made by `make demo`
first), so the examples see what a user who followed the quickstart sees. Prints one line per
command with its exit status and time; exits non-zero when any command failed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_readme import readme_commands  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-output", type=Path, default=ROOT / "demo_output", help="outputs of `make demo`")
    parser.add_argument("--skip", nargs="*", default=["demo"], help="commands not to run (default: demo itself)")
    args = parser.parse_args()
    if not (args.demo_output / "report.txt").exists():
        print(f"run `make demo` first: {args.demo_output}/report.txt is missing", file=sys.stderr)
        return 2
    wsiseg = Path(sys.executable).with_name("wsiseg")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="wsiseg-readme-") as scratch:
        os.symlink(ROOT / "configs", Path(scratch) / "configs")
        os.symlink(ROOT / "docs", Path(scratch) / "docs")
        os.symlink(args.demo_output.resolve(), Path(scratch) / "demo_output")
        for command in readme_commands():
            if command[0] in args.skip:
                continue
            expanded = [os.path.expanduser(token) for token in command]
            started = time.perf_counter()
            result = subprocess.run([str(wsiseg), *expanded], cwd=scratch, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            status = "ok  " if result.returncode == 0 else f"FAIL {result.returncode}"
            print(f"{status} {seconds:6.1f} s  wsiseg {shlex.join(command)}", flush=True)
            if result.returncode != 0:
                failures += 1
                print("    " + "\n    ".join((result.stderr or result.stdout).strip().splitlines()[-5:]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
