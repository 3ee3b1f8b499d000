"""Safe shared outputs: one run per output folder, all-or-nothing publishing, OS failures and Ctrl-C in one line."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_user_error, run_cli
from tests.train_fixtures import make_config, make_dataset, save_tiny_vit
from wsiseg.cli import main
from wsiseg.errors import WsisegError
from wsiseg.locks import acquire, lock_path, output_lock
from wsiseg.store.masks import MaskStore

CLASSES = ["background", "tumour", "stroma"]
MPP = 4.0


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One torch thread in subprocesses; after the test, drop the console log handler `main` installed
    (it writes to this test's captured stderr, closed after it)."""
    from wsiseg.progress import get_logger

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    logger = get_logger()
    for handler in [h for h in logger.handlers if getattr(h, "_wsiseg_console", False)]:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("model") / "tiny.pth", CLASSES, MPP)


def _labels(folder: Path) -> np.ndarray:
    return MaskStore.open(folder / "mask.zarr").level(0)[:]


def _one_error_line(capsys: pytest.CaptureFixture, *words: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --- the lock ---------------------------------------------------------------------------------
def test_lock_names_a_live_holder_and_takes_over_a_dead_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        holder = {"pid": sleeper.pid, "host": socket.gethostname(), "command": "segment", "started": time.time()}
        lock_path(out).write_text(json.dumps(holder))
        with pytest.raises(WsisegError, match=f"in use by wsiseg segment \\(pid {sleeper.pid} on {socket.gethostname()}"):
            acquire(out, "fseg")
    finally:
        sleeper.kill()
        sleeper.wait()
    lock_path(out).write_text(json.dumps({**holder, "pid": _dead_pid()}))
    with output_lock(out, "fseg") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and not path.exists()


def test_second_segment_on_one_out_is_refused_and_the_first_is_unchanged(
    samples: dict[str, Path], checkpoint: Path, tmp_path: Path
) -> None:
    from wsiseg.engine.segment import segment_slides

    out = tmp_path / "shared"
    command = [sys.executable, "-m", "wsiseg", "segment", str(samples["cmu_svs"]), "--checkpoint", str(checkpoint),
               "--out", str(out), "--export", "tiff", "--workers", "1"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not lock_path(out).exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # the first run holds the folder while the second one tries
        second = run_cli("segment", samples["cmu_svs"], "--checkpoint", checkpoint, "--out", out, "--overlap", "0.5")
        assert_user_error(second, f"in use by wsiseg segment (pid {first.pid}", "another --out")
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    segment_slides([samples["cmu_svs"]], checkpoint, tmp_path / "solo", exports=("tiff",), show_progress=False)
    assert np.array_equal(_labels(out), _labels(tmp_path / "solo"))
    assert not lock_path(out).exists()


# --- publishing -------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands for SIGKILL: nothing below the raise runs, no handler catches it."""


def test_a_kill_between_two_final_renames_is_completed_by_the_rerun(
    samples: dict[str, Path], checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsiseg.outputs
    from wsiseg.engine.segment import segment_slide

    options = {"exports": ("tiff", "png"), "workers": 0, "show_progress": False}
    original = wsiseg.outputs.publish
    calls = []

    def publish_then_die(partial: Path, final: Path) -> None:
        calls.append(final.name)
        if len(calls) == 2:
            raise Killed
        original(partial, final)

    monkeypatch.setattr(wsiseg.outputs, "publish", publish_then_die)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        segment_slide(samples["cmu_svs"], checkpoint, out, **options)
    assert (out / calls[0]).exists() and not (out / "summary.json").exists()  # half published, no marker
    monkeypatch.setattr(wsiseg.outputs, "publish", original)
    rerun = segment_slide(samples["cmu_svs"], checkpoint, out, **options)
    assert rerun["reused"]  # completed, not redone
    for name in ("mask.zarr", "mask.tif", "overlay.png", "summary.json"):
        assert (out / name).exists(), name
    assert not list(out.glob(".*partial*")) and not (out / ".publish.json").exists()
    segment_slide(samples["cmu_svs"], checkpoint, tmp_path / "clean", **options)
    assert np.array_equal(_labels(out), _labels(tmp_path / "clean"))


def test_outputs_without_their_marker_are_redone(samples: dict[str, Path], checkpoint: Path, tmp_path: Path) -> None:
    from wsiseg.engine.segment import segment_slide

    out = tmp_path / "out"
    out.mkdir()
    (out / "mask.tif").write_bytes(b"left by a killed run of an older wsiseg")
    summary = segment_slide(samples["cmu_svs"], checkpoint, out, exports=("tiff",), workers=0, show_progress=False)
    assert not summary.get("reused") and (out / "mask.tif").stat().st_size > 100


# --- one line for OS-level failures ----------------------------------------------------------
def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/chunk")


@pytest.mark.parametrize("command", ["tile", "segment", "fseg"])
def test_disk_full_is_one_line(command: str, samples: dict[str, Path], checkpoint: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import wsiseg.store.tiling

    slide = str(samples["cmu_svs"])
    if command == "tile":
        monkeypatch.setattr(wsiseg.store.tiling, "write_tiles", _no_space)
        argv = ["tile", slide, "--mpp", "8", "--tile", "64", "--out", str(tmp_path / "t")]
    else:
        monkeypatch.setattr(MaskStore, "write_rows", _no_space)
        argv = {
            "segment": ["segment", slide, "--checkpoint", str(checkpoint), "--export", "tiff"],
            "fseg": ["fseg", slide, "--k", "2", "--mpp", str(MPP), "--window", "64", "--device", "cpu"],
        }[command] + ["--out", str(tmp_path / "s"), "--workers", "0"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    _one_error_line(capsys, "no space left on the device (/data/out/chunk)", "rerun the same command to resume")


def test_disk_full_in_train_is_one_line(samples: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    import wsiseg.models.checkpoint

    @contextmanager
    def onto_a_full_disk(target: Path) -> Iterator[Path]:
        yield Path("/dev/full")  # every write fails with the kernel's ENOSPC

    config = make_config(tmp_path, make_dataset(tmp_path / "data", samples), training={"epochs": 1})
    monkeypatch.setattr(wsiseg.models.checkpoint, "atomic_file", onto_a_full_disk)
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(config)])
    assert exit_.value.code == 2
    _one_error_line(capsys, "no space left on the device", "--resume <output_dir>/checkpoints/last.pth")
    assert not lock_path(tmp_path / "run", inside=False).exists()


def test_read_only_out_is_one_line(samples: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    import wsiseg.store.tiling

    def read_only(*args: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "t"))

    monkeypatch.setattr(wsiseg.store.tiling, "write_tiles", read_only)
    with pytest.raises(SystemExit):
        main(["tile", str(samples["cmu_svs"]), "--mpp", "8", "--tile", "64", "--out", str(tmp_path / "t")])
    _one_error_line(capsys, "read-only file system", "writable --out")


def test_ctrl_c_is_one_line_saying_a_rerun_resumes(samples: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    import wsiseg.store.tiling

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(wsiseg.store.tiling, "write_tiles", interrupted)
    with pytest.raises(SystemExit) as exit_:
        main(["tile", str(samples["cmu_svs"]), "--mpp", "8", "--tile", "64", "--out", str(tmp_path / "t")])
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "Interrupted: rerun the same command to resume where it stopped."
    assert "Traceback" not in err


def test_reader_process_error_reaches_the_user_as_its_line() -> None:
    import torch

    from wsiseg.cli import one_line

    class Damaged(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> None:
            raise WsisegError("mask m.png has value 7 beyond the 4 classes: fix the mask or dataset.num_classes")

    with pytest.raises(WsisegError) as raised:
        next(iter(torch.utils.data.DataLoader(Damaged(), num_workers=1)))
    assert "Traceback" in str(raised.value)  # torch's wrapping
    assert one_line(raised.value) == "mask m.png has value 7 beyond the 4 classes: fix the mask or dataset.num_classes"


def test_tile_without_a_scheduler_needs_no_networking(samples: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from wsiseg.store.tiling import tile_slides

    def no_network(*args: object) -> None:
        raise OSError(errno.EPERM, "sockets are forbidden here")

    monkeypatch.setattr(socket.socket, "bind", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    results = tile_slides([samples["cmu_svs"]], tmp_path, 8.0, tile=64, progress=False)  # default --workers auto
    assert [r.status for r in results] == ["done"] and results[0].count > 0


def test_a_killed_checkpoint_save_leaves_no_temporary_behind(tmp_path: Path) -> None:
    from wsiseg.models.checkpoint import save_checkpoint
    from wsiseg.models.segmenter import build_segmenter

    target = tmp_path / "checkpoints" / "last.pth"
    target.parent.mkdir()
    killed = subprocess.run(
        [sys.executable, "-c", "import os, sys; from pathlib import Path; from wsiseg.outputs import temporary_sibling;"
         "Path(temporary_sibling(Path(sys.argv[1]))).write_bytes(b'half a checkpoint'); os._exit(9)", str(target)],
        check=False,
    )
    assert killed.returncode == 9
    (left,) = target.parent.glob(".last.*.partial.pth")
    mine = target.with_name(f".last.{os.getpid()}.1.partial.pth")
    mine.write_bytes(b"a live writer's")  # another thread of this live process: its temporary stays
    config = {"model": {"name": "timm:test_vit", "finetune_mode": "full", "input_size": 32}}
    save_checkpoint(target, build_segmenter(config["model"], 2), config, ["a", "b"])
    assert target.is_file() and not left.exists() and mine.exists()
