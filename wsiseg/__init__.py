"""wsiseg: segment whole-slide pathology images with pathology foundation models.

The public API mirrors the command line. Names are imported lazily so that
`import wsiseg` (and `wsiseg --help`) never pulls in torch, timm or peft.
"""

from __future__ import annotations

import importlib
from typing import Any

from wsiseg.errors import WsisegError

__version__ = "0.1.0"

# public name -> "module:attribute"
_API: dict[str, str] = {
    "fetch_samples": "wsiseg.samples:fetch_samples",
    "run_demo": "wsiseg.demo:run_demo",
    "run_checks": "wsiseg.doctor:run_checks",
    "train_model": "wsiseg.train.trainer:train_model",
    "infer_images": "wsiseg.train.infer:infer_images",
    "load_config": "wsiseg.config:load_config",
    "prepare_demo_dataset": "wsiseg.train.demo_data:prepare_demo_dataset",
    "fseg_slide": "wsiseg.fseg.api:fseg_slide",
    "fseg_slides": "wsiseg.fseg.slides:fseg_slides",
    "SlideResult": "wsiseg.driver:SlideResult",
    "fit_concepts": "wsiseg.fseg.api:fit_concepts",
    "load_segmenter": "wsiseg.models.checkpoint:load_segmenter",
    "build_segmenter": "wsiseg.models.segmenter:build_segmenter",
    "open_slide": "wsiseg.slide.reader:open_slide",
    "tile_slide": "wsiseg.store.tiling:tile_slide",
    "tile_slides": "wsiseg.store.tiling:tile_slides",
    "TileStore": "wsiseg.store.tiles:TileStore",
    "segment_slide": "wsiseg.engine.segment:segment_slide",
    "segment_slides": "wsiseg.engine.segment:segment_slides",
    "run_slide": "wsiseg.engine.run:run_slide",
    "RunSettings": "wsiseg.engine.settings:RunSettings",
    "FsegOptions": "wsiseg.fseg.options:FsegOptions",
    "export_mask": "wsiseg.export.mask:export_mask",
    "evaluate_mask": "wsiseg.engine.evaluate:evaluate_mask",
    "MaskStore": "wsiseg.store.masks:MaskStore",
}

__all__ = ["WsisegError", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'wsiseg' has no attribute {name!r}")
    module, attribute = _API[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted(__all__)
