"""Outputs appear under their final name only when complete; nothing is overwritten silently."""

from __future__ import annotations

import pytest

from wsiseg.errors import WsisegError
from wsiseg.outputs import atomic_output, partial_path


def test_output_is_renamed_only_on_success(tmp_path):
    final = tmp_path / "out.zarr"
    with pytest.raises(RuntimeError):
        with atomic_output(final) as partial:
            partial.mkdir()
            (partial / "half").write_text("x")
            raise RuntimeError("killed")
    assert not final.exists()
    assert (partial_path(final) / "half").exists()
    with atomic_output(final) as partial:
        assert (partial / "half").exists()  # resumed from what the interrupted run left
        (partial / "rest").write_text("y")
    assert sorted(p.name for p in final.iterdir()) == ["half", "rest"]
    assert not partial_path(final).exists()


def test_existing_output_needs_overwrite(tmp_path):
    final = tmp_path / "mask.tif"
    final.write_text("user file")
    with pytest.raises(WsisegError, match="--overwrite"):
        with atomic_output(final):
            pass
    assert final.read_text() == "user file"
    with atomic_output(final, overwrite=True) as partial:
        partial.write_text("new")
    assert final.read_text() == "new"


def test_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WsisegError, match="cannot create the output folder"):
        with atomic_output(blocker / "sub" / "out.zarr"):
            pass


def test_run_log_file_gets_records_and_restores_the_logger(tmp_path):
    import logging

    from wsiseg.progress import get_logger, log_to_file

    logger = get_logger()
    before = logger.level
    with log_to_file(tmp_path / "run.log"):
        get_logger("test").info("inside the run")
    get_logger("test").info("after the run")
    text = (tmp_path / "run.log").read_text()
    assert "inside the run" in text and "after the run" not in text
    assert logger.level == before
    assert not any(isinstance(h, logging.FileHandler) for h in logger.handlers)


def test_atomic_file_appears_only_when_written_whole(tmp_path):
    from wsiseg.outputs import atomic_file

    target = tmp_path / "picture.png"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as temporary:
            assert temporary.suffix == ".png" and temporary.parent == tmp_path
            temporary.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary is left
    target.write_bytes(b"old")
    with atomic_file(target) as temporary:
        temporary.write_bytes(b"new")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]
