"""Window predictors: what turns a batch of RGB windows into per-pixel scores.

The engine knows nothing else about a model. `segment` uses `SegmenterPredictor` (softmax of
the segmenter's logits); F-Seg brings its own predictor (concept weights) with the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from wsiseg.progress import get_logger

if TYPE_CHECKING:
    import torch

log = get_logger("engine")


@runtime_checkable
class Predictor(Protocol):
    """Turns (B, 3, h, w) float [0, 1] RGB on the device into (B, K, h, w) non-negative scores."""

    num_outputs: int
    class_names: list[str]
    colors: list[tuple[int, int, int]] | None

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Scores of a batch, on the batch's device."""
        ...


def autocast_dtype(device: Any, precision: str = "auto") -> Any:
    """The autocast dtype for `precision` on `device`: bf16 (or fp16 without bf16) on CUDA, none on CPU."""
    import torch

    device = torch.device(device)
    if precision == "fp32" or (device.type != "cuda" and precision == "auto"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class SegmenterPredictor:
    """Softmax probabilities of a segmenter (logits at input size), under autocast on GPU."""

    def __init__(
        self,
        model: Any,
        class_names: Sequence[str],
        colors: Sequence[Sequence[int]] | None = None,
        precision: str = "auto",
    ) -> None:
        self.model = model
        self.class_names = list(class_names)
        self.num_outputs = len(self.class_names)
        self.colors = [tuple(int(v) for v in c[:3]) for c in colors] if colors else None
        self.precision = precision
        self.input_multiple = int(getattr(model, "input_multiple", 1) or 1)
        self.config: dict[str, Any] | None = None  # the training config, when loaded from a checkpoint

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax over classes of the model's logits (float32)."""
        import torch

        dtype = autocast_dtype(batch.device, self.precision)
        with torch.inference_mode():
            if dtype is None:
                logits = self.model(batch)
            else:
                with torch.autocast(device_type=batch.device.type, dtype=dtype):
                    logits = self.model(batch)
            return torch.softmax(logits.float(), dim=1)


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class BatchRunner:
    """Runs a predictor on batches, halving the batch (and remembering it) when the device runs out of memory."""

    def __init__(self, predictor: Predictor, batch_size: int) -> None:
        self.predictor = predictor
        self.batch_size = batch_size

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Scores of the whole batch, computed in pieces of at most `batch_size`."""
        import torch

        start, pieces = 0, []
        while start < batch.shape[0]:
            piece = batch[start : start + self.batch_size]
            try:
                pieces.append(self.predictor.predict(piece))
            except (RuntimeError, torch.OutOfMemoryError) as error:
                if not _is_out_of_memory(error) or piece.shape[0] == 1:
                    raise
                if batch.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.batch_size = max(piece.shape[0] // 2, 1)
                log.warning(
                    "a batch of %d windows does not fit in device memory: retrying with batches of %d",
                    piece.shape[0], self.batch_size,
                )
                continue
            start += piece.shape[0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
