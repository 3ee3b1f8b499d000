"""Windowslide mode: batches of windows through the predictor, blended in stripes, written in a thread."""

from __future__ import annotations

import queue
import threading
from typing import Any

from wsiseg.engine.blend import StripeBlender, StripeSink, window_weights
from wsiseg.engine.predictors import BatchRunner, Predictor
from wsiseg.engine.settings import RunSettings
from wsiseg.engine.source import SourceView
from wsiseg.store.masks import MaskStore


class BackgroundWriter:
    """Hands finished stripes to `write` in a thread, in order, so the device never waits on disk."""

    def __init__(self, write: Any, depth: int = 4) -> None:
        self.write = write
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="wsiseg-mask-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.write(*item)
                except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = error

    def __call__(self, *item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self) -> None:
        """Wait until every stripe is written; raise what the writer hit, if anything."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def predict_windows(
    view: SourceView,
    positions: list[tuple[int, int]],
    store: MaskStore,
    sink: StripeSink,
    predictor: Predictor,
    settings: RunSettings,
    device: Any,
    workers: int,
    batch_size: int,
    advance: Any,
) -> int:
    """Windowslide: blend every window from the first one still needed; returns windows run."""
    from wsiseg.engine.loader import iterate_batches

    window, mpp = settings.window, settings.mpp
    start_row = store.rows_done
    first_needed = next((i for i, (_, y) in enumerate(positions) if y + window > start_row), len(positions))
    first_batch = first_needed // batch_size
    advance(first_batch * batch_size)
    writer = BackgroundWriter(sink)
    blender = StripeBlender(
        view.width, view.height, window, predictor.num_outputs, window_weights(window, settings.blend),
        writer, background=settings.background, start_row=start_row, device=device,
        keep_probabilities=store.probabilities is not None,
    )
    runner = BatchRunner(predictor, batch_size)
    count = 0
    batches = iterate_batches(view.reader, positions, window, mpp, batch_size, workers, device, first_batch)
    try:
        for indices, batch in batches:
            scores = runner(batch)
            for index, score in zip(indices, scores):
                x, y = positions[index]
                blender.add(score, x, y)
            count += len(indices)
            advance(len(indices))
        blender.close()
    finally:
        batches.close()
        writer.close()
    return count
