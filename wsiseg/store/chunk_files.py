"""Whole chunk rows of a 2-D zarr array written as chunk files directly: the bytes zarr writes, without its
asyncio machinery.

zarr spends about 1 ms of CPU per 512 x 512 label chunk in its own threads (tasks, buffers, a
fill-value comparison), where encoding the chunk costs ~0.1 ms. For the layout the mask store
creates (a local store, zstd after the bytes codec, `/`-separated default keys, fill value 0,
empty chunks left out) this writes each chunk of a row as zarr does: padded with the fill value
to the full chunk shape, compressed by the same numcodecs codec with the same settings, renamed
into place; an all-fill chunk is not stored (a stale file of it is removed). Any other layout
goes through zarr.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.outputs import atomic_file


@dataclass(frozen=True)
class ChunkFiles:
    """Where the chunk files of a plain (bytes + zstd) 2-D array lie and how they are encoded."""

    folder: Path  # the array's "c" folder: chunk (row, column) is folder/row/column
    chunks: tuple[int, int]
    shape: tuple[int, int]
    dtype: np.dtype
    encoder: Any

    @classmethod
    def of(cls, array: Any) -> ChunkFiles | None:
        """The chunk files of `array`, or None where its layout is not the plain one described above."""
        from numcodecs.zstd import Zstd
        from zarr.codecs import BytesCodec, ZstdCodec
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
        from zarr.storage import LocalStore

        meta = array.metadata
        codecs = getattr(meta, "codecs", ())
        plain = (
            isinstance(array.store, LocalStore) and meta.zarr_format == 3 and len(array.shape) == 2
            and len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], ZstdCodec)
            and (array.dtype.itemsize == 1 or getattr(codecs[0].endian, "value", None) == sys.byteorder)
            and meta.chunk_key_encoding == DefaultChunkKeyEncoding(separator="/")
            and meta.fill_value == 0 and not array.config.write_empty_chunks
        )
        if not plain:
            return None
        encoder = Zstd(level=codecs[1].level, checksum=codecs[1].checksum)
        folder = Path(array.store.root) / array.path / "c"
        return cls(folder, tuple(array.chunks), tuple(array.shape), np.dtype(array.dtype), encoder)

    def write_row(self, y0: int, block: np.ndarray) -> bool:
        """Write `block` as rows y0.. if it is one whole chunk row (True), else leave it to zarr (False)."""
        chunk_h, chunk_w = self.chunks
        height, width = self.shape
        if y0 % chunk_h or block.shape != (min(chunk_h, height - y0), width) or block.dtype != self.dtype:
            return False
        row_folder = self.folder / str(y0 // chunk_h)
        row_folder.mkdir(parents=True, exist_ok=True)
        tile = np.zeros((chunk_h, chunk_w), self.dtype)
        for column, x in enumerate(range(0, width, chunk_w)):
            part = block[:, x : x + chunk_w]
            tile[: part.shape[0], : part.shape[1]] = part
            if part.shape != tile.shape:
                tile[part.shape[0] :] = 0
                tile[:, part.shape[1] :] = 0
            path = row_folder / str(column)
            if not tile.any():
                path.unlink(missing_ok=True)
                continue
            with atomic_file(path) as temporary:
                temporary.write_bytes(self.encoder.encode(tile))
        return True
