"""Concept banks: sets of non-negative concept vectors for several k, with what they were fitted on.

A wsiseg bank is one safetensors file: a float32 tensor ``k<K>`` of shape (K, D) per k value,
and JSON-able metadata (model, layer, MPP, window, k values, feature dimension). The published
F-Seg joblib banks ({k: (k, D) array}) load too, with unknown model/layer/MPP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.errors import WsisegError
from wsiseg.outputs import atomic_output
from wsiseg.progress import get_logger

log = get_logger("fseg")

FORMAT = "wsiseg-concept-bank"
VERSION = "1"
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class ConceptBank:
    """Concept matrices {k: float32 (k, D)} plus the model, layer and MPP they were fitted with."""

    concepts: dict[int, np.ndarray]
    model: str | None = None
    layer: str | None = None
    mpp: float | None = None
    window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.concepts:
            raise WsisegError("a concept bank needs at least one k: pass a bank with one or more concept matrices")
        for k, c in self.concepts.items():
            if np.ndim(c) != 2 or np.shape(c)[0] != k:
                raise WsisegError(f"the concept bank's k={k} entry must be a ({k}, D) matrix, got shape {np.shape(c)}")
        dims = {int(c.shape[1]) for c in self.concepts.values()}
        if len(dims) != 1:
            raise WsisegError(
                f"a concept bank's matrices must share one feature length, got {sorted(dims)}: "
                "pass a bank fitted with one model and layer"
            )
        self.concepts = {int(k): np.ascontiguousarray(c, dtype=np.float32) for k, c in sorted(self.concepts.items())}

    @property
    def ks(self) -> list[int]:
        """The k values held."""
        return sorted(self.concepts)

    @property
    def feature_dim(self) -> int:
        """Length D of each concept vector."""
        return int(next(iter(self.concepts.values())).shape[1])

    def get(self, k: int) -> np.ndarray:
        """A copy of the (k, D) concept matrix; WsisegError if this bank has no such k."""
        if k not in self.concepts:
            raise WsisegError(f"the concept bank has no k={k} (it has k = {', '.join(map(str, self.ks))}): pass one of those to --k")
        return self.concepts[k].copy()

    def finite_concepts(self, k: int) -> np.ndarray:
        """A copy of the (k, D) concept matrix, refused (WsisegError) when k is absent or an entry is NaN or infinite."""
        concepts = self.get(k)
        bad = ~np.isfinite(concepts)
        if bad.any():
            rows = sorted({int(r) for r in np.nonzero(bad)[0]})
            raise WsisegError(
                f"the concept bank's k={k} matrix holds {int(bad.sum())} NaN or infinite entries (in concept"
                f"{'s' if len(rows) > 1 else ''} {', '.join(map(str, rows[:8]))}{' ...' if len(rows) > 8 else ''}): "
                "refit the bank with `wsiseg fseg-fit`, or fix it where it was made"
            )
        return concepts

    def projection_concepts(self, k: int) -> np.ndarray:
        """The (k, D) concepts a projection uses: finite, with negative entries set to 0.

        Concepts are non-negative by definition (cluster centres of ReLU'd features); a bank made
        elsewhere may hold negative entries, which the published F-Seg library sets to 0 before
        projecting: so does this, with one warning giving their count and the most negative value.
        NaN or infinite entries are an error.
        """
        concepts = self.finite_concepts(k)
        negative = concepts < 0
        if negative.any():
            log.warning(
                "the concept bank's k=%d matrix has %d negative entries (most negative %.4g): set to 0, as the "
                "F-Seg reference library does (concepts are non-negative)",
                k, int(negative.sum()), float(concepts.min()),
            )
            concepts[negative] = 0
        if not concepts.any(axis=1).all():
            empty = [int(i) for i in np.flatnonzero(~concepts.any(axis=1))]
            log.warning("concept(s) %s of k=%d are all zero: no pixel can take them", ", ".join(map(str, empty)), k)
        return concepts

    def check_compatible(self, model: str, feature_dim: int, layer: str | None = None) -> None:
        """Refuse a bank fitted for another model, layer or feature size."""
        if self.model is not None and self.model != model:
            raise WsisegError(
                f"the concept bank was fitted with model {self.model}, not {model}: pass --model {self.model} "
                "or fit a bank for this model with `wsiseg fseg-fit`"
            )
        if self.feature_dim != feature_dim:
            raise WsisegError(
                f"the concept bank has {self.feature_dim}-long concepts but model {model} gives {feature_dim}-long "
                f"features{'' if self.model is None else f' (bank fitted with {self.model})'}: use a bank fitted "
                "with this model (wsiseg fseg-fit) or pass the bank's --model"
            )
        if layer is not None and self.layer is not None and self.layer != layer:
            raise WsisegError(
                f"the concept bank was fitted on layer {self.layer}, not {layer}: use the same layer or refit the bank"
            )

    def metadata(self) -> dict[str, Any]:
        """What the bank records besides the concept matrices."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "layer": self.layer,
            "mpp": self.mpp,
            "window": self.window,
            "k_values": self.ks,
            "feature_dim": self.feature_dim,
            **self.extra,
        }


def save_bank(bank: ConceptBank, path: Path, overwrite: bool = False) -> Path:
    """Write `bank` to a safetensors file at `path` (atomically; refuses to overwrite without `overwrite`)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {f"k{k}": c for k, c in bank.concepts.items()}
    metadata = {key: json.dumps(value) for key, value in bank.metadata().items()}
    with atomic_output(path, overwrite=overwrite, resume=False) as partial:
        save_file(tensors, str(partial), metadata=metadata)
    return path


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return 0 < size < _SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def load_bank(path: Path) -> ConceptBank:
    """Read a wsiseg bank (safetensors) or a published F-Seg joblib bank."""
    path = Path(path)
    if not path.exists():
        raise WsisegError(f"concept bank {path} does not exist: check the path, or fit one with `wsiseg fseg-fit`")
    if path.is_dir():
        raise WsisegError(f"concept bank {path} is a folder: pass the bank file itself")
    if not _is_safetensors(path):
        from wsiseg.fseg.joblib_banks import load_joblib_bank

        return ConceptBank(load_joblib_bank(path), extra={"source": "joblib"})
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            raw = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise WsisegError(f"cannot read concept bank {path}: {error}; refit it with `wsiseg fseg-fit`") from None
    try:
        meta = {key: json.loads(value) for key, value in raw.items()}
        concepts = {int(name[1:]): array for name, array in tensors.items() if name.startswith("k")}
        known = {"format", "version", "model", "layer", "mpp", "window", "k_values", "feature_dim"}
        return ConceptBank(
            concepts,
            model=meta.get("model"),
            layer=meta.get("layer"),
            mpp=meta.get("mpp"),
            window=meta.get("window"),
            extra={key: value for key, value in meta.items() if key not in known},
        )
    except (ValueError, TypeError) as error:
        raise WsisegError(f"{path} is not a wsiseg concept bank ({error}); refit it with `wsiseg fseg-fit`") from None
