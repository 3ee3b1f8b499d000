"""Outputs that appear under their final name only when complete, and never overwrite silently."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wsiseg.errors import WsisegError


def partial_path(final: Path) -> Path:
    """Where an output is built before it is renamed to `final` (kept on failure, for resume)."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def check_writable(final: Path, overwrite: bool) -> None:
    """Refuse an existing output without `overwrite`, or a folder we cannot write into."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise WsisegError(f"{final} already exists: pass --overwrite to replace it, or choose another output path")
    parent = final.parent if str(final.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WsisegError(
            f"cannot create the output folder {parent} ({error.strerror}: a file may stand in its path); "
            "choose a writable --out"
        ) from None
    probe = parent / f".{final.name}.write-test"
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise WsisegError(f"cannot write into {parent}: {error.strerror}; choose a writable --out") from None


def remove(path: Path) -> None:
    """Remove a file or folder if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and folder under a folder, to the disk.

    A folder (a zarr store of thousands of chunks) is flushed with one syncfs of its file
    system where Linux offers it; elsewhere file by file.
    """
    path = Path(path)
    if not path.is_dir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        return
    if _syncfs(path):
        return
    for root, _, files in os.walk(path):
        for name in files:
            fsync_tree(Path(root) / name)
        _fsync_folder(Path(root))


def _syncfs(folder: Path) -> bool:
    """syncfs(2) of the file system holding `folder`; False where it is unavailable."""
    import ctypes

    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return False
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        return syncfs(descriptor) == 0
    finally:
        os.close(descriptor)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (renames into it) to the disk, where the system allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems cannot sync a folder; the renames are still atomic
    finally:
        os.close(descriptor)


def publish(partial: Path, final: Path) -> None:
    """Move a finished partial output onto its final name (replacing what was there), durably."""
    final = Path(final)
    fsync_tree(partial)
    if final.exists():
        remove(final)
    Path(partial).rename(final)
    _fsync_folder(final.parent if str(final.parent) else Path("."))


def write_durably(target: Path, text: str) -> None:
    """Write `text` to `target` through a temporary sibling, flushed to the disk before the rename."""
    with atomic_file(target) as temporary:
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    _fsync_folder(Path(target).parent)


JOURNAL_NAME = ".publish.json"


def publish_together(folder: Path, moves: list[tuple[Path, Path]], marker: Path, marker_text: str) -> None:
    """Make several partial outputs final together, the completion `marker` last.

    A journal listing the renames is written first; a run killed midway leaves it, and
    `finish_publish` (called by the rerun) completes the renames and writes the marker. So a
    folder holds either the old outputs, or all the new ones with their marker.
    """
    folder = Path(folder)
    for partial, _ in moves:
        fsync_tree(partial)
    write_durably(folder / JOURNAL_NAME, json.dumps({  # names inside `folder`: the rerun may run from elsewhere
        "moves": [[Path(partial).name, Path(final).name] for partial, final in moves],
        "marker": Path(marker).name, "marker_text": marker_text,
    }))
    finish_publish(folder)


def finish_publish(folder: Path) -> bool:
    """Complete a publish an interrupted run left in `folder` (see `publish_together`); whether one was found."""
    folder = Path(folder)
    journal = folder / JOURNAL_NAME
    try:
        plan = json.loads(journal.read_text())
    except FileNotFoundError:
        return False
    for partial, final in plan["moves"]:
        if (folder / partial).exists():
            publish(folder / partial, folder / final)
    write_durably(folder / plan["marker"], plan["marker_text"])
    journal.unlink()
    _fsync_folder(folder)
    return True


@contextmanager
def atomic_output(final: Path, overwrite: bool = False, resume: bool = True) -> Iterator[Path]:
    """Yield the partial path to write; rename it to `final` when the block ends without error.

    A partial output left by an interrupted run is handed back for resuming when `resume` is
    true (and cleared otherwise, or with `overwrite`). On error the partial output is kept.
    """
    final = Path(final)
    check_writable(final, overwrite)
    partial = partial_path(final)
    if partial.exists() and (overwrite or not resume):
        remove(partial)
    yield partial
    publish(partial, final)


TEMPORARY_GLOB = ".*.partial*"  # matches every name `temporary_sibling` makes


def temporary_sibling(target: Path) -> Path:
    """A temporary name beside `target`, unique to this process and thread, keeping its suffix."""
    target = Path(target)
    return target.with_name(f".{target.stem}.{os.getpid()}.{threading.get_ident()}.partial{target.suffix}")


def remove_dead_temporaries(target: Path) -> list[Path]:
    """Remove the temporaries of `target` that writers killed on this machine left (their pid is gone)."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.stem)}\.(\d+)\.\d+\.partial{re.escape(target.suffix)}$")
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.stem)}.*.partial*"):
        match = pattern.match(path.name)
        if match and not process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to write; rename it over `target` when the block ends.

    The temporary name is unique to this process and thread (parallel writers never collide)
    and keeps the suffix (libraries that pick a format by extension still do); on error it is
    removed, so a half-written file never shows under either name.
    """
    temporary = temporary_sibling(target)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
