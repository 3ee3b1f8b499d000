"""Read the published F-Seg concept banks (joblib pickles of {k: float32 (k, D)}) without joblib.

joblib writes numpy arrays into a pickle as a small wrapper object followed by the raw array
bytes. This reader understands that layout, and plain pickled arrays, with a restricted
unpickler: only the numpy classes needed to rebuild arrays can be named by the file, so a
hostile pickle cannot run code (which joblib.load would allow). Compressed joblib files
(zlib, gzip, bz2, xz/lzma) are decompressed with the standard library.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.errors import WsisegError

_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
}


class _ArrayHeader:
    """Stands in for joblib's array wrapper: holds shape, order and dtype until the bytes are read."""


class _BankUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD step can be extended
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("joblib.numpy_pickle", "NumpyArrayWrapper"):
            return _ArrayHeader
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a concept bank")

    def _build_then_read_array(self) -> None:
        pickle._Unpickler.load_build(self)
        header = self.stack[-1]
        if isinstance(header, _ArrayHeader):
            self.stack[-1] = self._read_array(header)

    dispatch[pickle.BUILD[0]] = _build_then_read_array

    def _read_array(self, header: _ArrayHeader) -> np.ndarray:
        state = header.__dict__
        dtype = np.dtype(state["dtype"])
        if dtype.hasobject:
            raise pickle.UnpicklingError("object arrays are not concept banks")
        shape = tuple(int(s) for s in state["shape"])
        if state.get("numpy_array_alignment_bytes") is not None:
            padding = self.read(1)[0]
            self.read(padding)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        data = self.read(size)
        if len(data) != size:
            raise pickle.UnpicklingError("file ends inside an array")
        array = np.frombuffer(data, dtype=dtype)
        if state.get("order") == "F":
            array = array.reshape(shape[::-1]).T
        else:
            array = array.reshape(shape)
        return np.array(array, dtype=dtype.newbyteorder("="))


def _decompressed(raw: bytes) -> bytes:
    """The pickle bytes of a possibly compressed joblib file."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00" or raw[:3] == b"\x5d\x00\x00":
        return lzma.decompress(raw)
    if raw[:1] == b"\x78":
        return zlib.decompress(raw)
    if raw[:4] == b"\x04\x22\x4d\x18":
        raise WsisegError("LZ4-compressed joblib banks are not supported: re-save the bank uncompressed")
    return raw


def load_joblib_bank(path: Path) -> dict[int, np.ndarray]:
    """Read a published F-Seg bank: {k: float32 array (k, D)}."""
    path = Path(path)
    try:
        data = _decompressed(path.read_bytes())
        obj = _BankUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, IndexError,
            AttributeError, OSError, zlib.error, lzma.LZMAError) as error:
        raise WsisegError(
            f"{path} is not a concept bank ({error}); pass a bank written by `wsiseg fseg-fit` "
            "or a joblib dict {k: (k, D) array}"
        ) from None
    if not isinstance(obj, dict) or not obj:
        raise WsisegError(f"{path} does not hold a dict {{k: (k, D) array}}; pass an F-Seg concept bank")
    banks: dict[int, np.ndarray] = {}
    for key, value in obj.items():
        array = np.asarray(value)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
            raise WsisegError(f"{path}: entry {key!r} is not a (k, D) array; pass an F-Seg concept bank")
        k = int(key) if isinstance(key, (int, np.integer)) else int(array.shape[0])
        if k != array.shape[0]:
            raise WsisegError(f"{path}: entry k={k} holds {array.shape[0]} concepts; pass an F-Seg concept bank")
        banks[k] = array.astype(np.float32)
    return banks
