"""Slides that fail while being opened for tiling leave no file handle open."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from wsiseg.errors import WsisegError
from wsiseg.samples import _derive_hgsc_mask
from wsiseg.slide import backends


def test_failed_probe_read_closes_the_backend(samples, monkeypatch):
    closed = []
    close = backends.OpenSlideBackend.close
    monkeypatch.setattr(backends.OpenSlideBackend, "close", lambda self: closed.append(self) or close(self))
    with pytest.raises(WsisegError, match="corrupt"):
        backends.open_backend(samples["unreadable_svs"])
    assert len(closed) == 1


def test_unsupported_tiff_pixels_close_the_file(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((32, 32), np.float32))
    opened = []

    class Recording(tifffile.TiffFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(backends.tifffile, "TiffFile", Recording)
    with pytest.raises(WsisegError, match="float32 pixels"):
        backends.TiffBackend(tmp_path / "float.tif")
    assert len(opened) == 1 and opened[0].filehandle.closed


def test_npz_is_read_and_closed(samples, tmp_path, monkeypatch):
    from wsiseg.samples import _local_name, cache_dir

    loaded = []
    load = np.load
    monkeypatch.setattr(np, "load", lambda *args, **kwargs: loaded.append(load(*args, **kwargs)) or loaded[-1])
    _derive_hgsc_mask(cache_dir() / _local_name("hgsc_type_npz"), tmp_path / "mask.png")
    assert (tmp_path / "mask.png").is_file()
    assert len(loaded) == 1 and loaded[0].fid is None  # NpzFile.close() drops its file
