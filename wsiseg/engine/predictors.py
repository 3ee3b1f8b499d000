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
    """Turns (B, 3, h, w) float [0, 1] RGB on the device into (B, K, h, w) non-negative scores.

    A predictor with a true `uint8_input` attribute gets the windows as read instead, (B, 3, h, w)
    uint8 0-255, and converts them itself where it needs floats (or never, if it ignores them).
    """

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


class FloatConverter:
    """uint8 0-255 windows to float [0, 1] (x / 255 in float32) in one buffer reused from batch to batch.

    The result keeps the input's memory layout (the loader's channels-last), as `x.float() / 255`
    would: models give the same bits for the same layout. A fresh float batch each time would cost
    a page fault per 4 KiB on the CPU (measured: 1.3 ms per 512 px window; 0.35 ms reused).
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """The float windows of `pixels`, valid until the next call."""
        import torch

        buffer = self.buffer
        if buffer is None or buffer.shape[0] < pixels.shape[0] or buffer.shape[1:] != pixels.shape[1:] \
                or buffer.stride() != pixels.stride() or buffer.device != pixels.device:
            buffer = self.buffer = torch.empty_like(pixels, dtype=torch.float32)
        out = buffer[: pixels.shape[0]]
        out.copy_(pixels)
        return out.div_(255.0)


class BatchRunner:
    """Runs a predictor on batches, halving the batch (and remembering it) when the device runs out of memory.

    uint8 batches (the loader's) are converted to float [0, 1] piece by piece, unless the predictor
    takes `uint8_input`; float batches go to the predictor as they are.
    """

    def __init__(self, predictor: Predictor, batch_size: int) -> None:
        self.predictor = predictor
        self.batch_size = batch_size
        self.to_float = FloatConverter()

    def _input(self, piece: torch.Tensor) -> torch.Tensor:
        import torch

        if piece.dtype != torch.uint8 or getattr(self.predictor, "uint8_input", False):
            return piece
        return self.to_float(piece)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Scores of the whole batch, computed in pieces of at most `batch_size`."""
        import torch

        start, pieces = 0, []
        while start < batch.shape[0]:
            piece = batch[start : start + self.batch_size]
            try:
                pieces.append(self.predictor.predict(self._input(piece)))
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
