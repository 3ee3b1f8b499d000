"""Mask rows written as chunk files directly: the same files, byte for byte, as zarr writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from wsiseg.slide.grid import Frame
from wsiseg.store import chunk_files
from wsiseg.store.chunk_files import ChunkFiles
from wsiseg.store.masks import MaskStore


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def smooth_labels(height: int, width: int, classes: int, seed: int) -> np.ndarray:
    """Blobs of labels with background bands, so that some chunks are empty and some are not."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, classes, (height // 40 + 1, width // 40 + 1))
    labels = np.kron(coarse, np.ones((40, 40), np.int64))[:height, :width]
    labels[:, : width // 3] = 0
    return labels.astype(np.uint8 if classes <= 255 else np.uint16)


def write_store(path: Path, labels: np.ndarray, classes: int, stripes: int) -> MaskStore:
    height, width = labels.shape
    names = [f"c{k}" for k in range(classes)]
    store = MaskStore.create(path, Frame(width, height, 0.5, 0.5, (0, 0)), names, chunk=64)
    for y in range(0, height, stripes):
        store.write_rows(y, labels[y : y + stripes])
    return store


@pytest.mark.parametrize("classes", [4, 300])
def test_chunk_rows_are_the_files_zarr_writes(tmp_path, monkeypatch, classes):
    labels = smooth_labels(200, 330, classes, seed=classes)  # partial chunks at the right and the bottom
    direct = write_store(tmp_path / "direct.zarr", labels, classes, stripes=48)
    assert isinstance(direct._chunk_files, ChunkFiles)
    monkeypatch.setattr(chunk_files.ChunkFiles, "of", classmethod(lambda cls, array: None))
    through_zarr = write_store(tmp_path / "zarr.zarr", labels, classes, stripes=48)
    assert through_zarr._chunk_files is False
    written = files_of(tmp_path / "direct.zarr" / "0")
    assert written == files_of(tmp_path / "zarr.zarr" / "0")
    assert 0 < sum(name.startswith("c/") for name in written) < 4 * 6  # empty chunks are left out
    assert np.array_equal(zarr.open_array(str(tmp_path / "direct.zarr" / "0"), mode="r")[:], labels)
    assert direct.pixel_counts == through_zarr.pixel_counts


def test_a_rewritten_empty_chunk_loses_its_file(tmp_path):
    """A chunk row written again (a resumed run) replaces its chunks; one now empty is removed, as zarr does."""
    labels = smooth_labels(128, 200, 4, seed=1)
    labels[:64, 150:] = 3
    store = write_store(tmp_path / "mask.zarr", labels, 4, stripes=64)
    assert (tmp_path / "mask.zarr" / "0" / "c" / "0" / "3").is_file()
    files = store._chunk_files
    cleared = labels[:64].copy()
    cleared[:, 128:] = 0
    assert files.write_row(0, cleared)
    assert not (tmp_path / "mask.zarr" / "0" / "c" / "0" / "3").exists()
    assert np.array_equal(zarr.open_array(str(tmp_path / "mask.zarr" / "0"), mode="r")[:64], cleared)
    assert not files.write_row(10, cleared)  # not a chunk row: left to zarr


def test_a_resumed_store_drops_the_chunk_temporaries_of_a_killed_run(tmp_path):
    """A run killed while writing a chunk file leaves its temporary in the chunk folder: resuming removes it
    and keeps the rows already finished."""
    labels = smooth_labels(128, 200, 4, seed=2)
    frame = Frame(200, 128, 0.5, 0.5, (0, 0))
    first = MaskStore.resume_or_create(tmp_path / "mask.zarr", {"run": 1}, frame, class_names=["a", "b", "c", "d"],
                                       chunk=64)
    first.write_rows(0, labels[:64])
    leftover = tmp_path / "mask.zarr" / "0" / "c" / "1" / ".2.4242.17.partial"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a chunk")
    again = MaskStore.resume_or_create(tmp_path / "mask.zarr", {"run": 1}, frame, class_names=["a", "b", "c", "d"],
                                       chunk=64)
    assert again.rows_done == 64 and not leftover.exists()
    assert np.array_equal(again.level(0)[:64], labels[:64])
