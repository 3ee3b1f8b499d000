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
