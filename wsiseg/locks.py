"""One run per output folder: a lock file naming its holder (pid, host, command), stale ones taken over."""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wsiseg.errors import WsisegError
from wsiseg.outputs import process_alive, temporary_sibling
from wsiseg.progress import get_logger

log = get_logger("lock")

LOCK_NAME = ".wsiseg.lock"


def lock_path(out: Path, inside: bool = True) -> Path:
    """The lock of an output: inside a folder of outputs, beside a store (.zarr) or where asked (`inside`)."""
    out = Path(out)
    return out.with_name(f".{out.name}.lock") if out.suffix == ".zarr" or not inside else out / LOCK_NAME


def _holder(path: Path) -> dict[str, Any] | None:
    """The lock's content, or None when it vanished or is unreadable (a holder killed mid-write)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder.get("started", 0)))
    return f"wsiseg {holder.get('command', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {since})"


def _try_create(path: Path, content: str) -> bool:
    """Create the lock with its content in one step: written to a temporary, then hard-linked into place.

    A lock created empty and written after would let a second run, reading it in between, take a
    live run's lock for a stale one.
    """
    temporary = temporary_sibling(path)
    try:
        with open(temporary, "w") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)
    return True


def acquire(out: Path, command: str, inside: bool = True) -> Path:
    """Take the lock of `out` for this process; refuse in one line when a live run holds it."""
    path = lock_path(out, inside)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WsisegError(
            f"cannot create the output folder {path.parent} ({error.strerror}: a file may stand in its path); "
            "choose a writable --out"
        ) from None
    host = socket.gethostname()
    content = json.dumps({"pid": os.getpid(), "host": host, "command": command, "started": time.time(),
                          "argv": sys.argv})
    for _ in range(3):
        if _try_create(path, content):
            return path
        holder = _holder(path)
        if holder is None:
            continue  # released between our attempt and our look: try again
        if holder.get("host") not in (host, None) or (holder.get("pid") and process_alive(int(holder["pid"]))):
            if holder.get("pid") == os.getpid() and holder.get("host") == host:
                raise WsisegError(f"{out} is already used by this process: give each run its own --out")
            raise WsisegError(
                f"{out} is in use by {_describe(holder)}: wait for it to finish or choose another --out "
                f"(if that run is dead, delete {path})"
            )
        log.warning("taking over the stale lock of %s: its holder %s is gone", out, _describe(holder))
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    raise WsisegError(f"cannot take the lock {path}: other runs keep taking it; choose another --out")


def release(path: Path | None) -> None:
    """Remove the lock file (as `acquire` returned it) if this process still holds it."""
    holder = _holder(path) if path is not None else None
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        try:
            path.unlink()
        except OSError as error:
            if error.errno != errno.ENOENT:
                log.warning("could not remove the lock %s: %s", path, error.strerror)


@contextmanager
def output_lock(out: Path | str, command: str, inside: bool = True) -> Iterator[Path]:
    """Hold the lock of output `out` for the block (see `acquire`)."""
    path = acquire(Path(out), command, inside)
    try:
        yield path
    finally:
        release(path)
