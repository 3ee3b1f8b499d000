"""Reading stores as OME-Zarr tools do: the spec's validator (ome-zarr-models), and zarr without warnings."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import zarr


def walk_without_warnings(path: Path) -> list[str]:
    """Every node under the group at `path`, listed by zarr with its warnings raised as errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(str(path), mode="r")
        return sorted(name for name, _ in group.members(max_depth=None))


def validate(path: Path, kind: str) -> Any:
    """The ome-zarr-models model of the store at `path` (`kind`: "image" or "label"), or its validation error."""
    from ome_zarr_models.v05 import Image, ImageLabel

    walk_without_warnings(path)
    group = zarr.open_group(str(path), mode="r")
    model = {"image": Image, "label": ImageLabel}[kind].from_zarr(group)
    multiscale = model.attributes.ome.multiscales[0]
    assert multiscale.metadata, "multiscales[].metadata (a SHOULD of the spec) is missing"
    if kind == "label":
        assert model.attributes.ome.image_label.version == "0.5"
    return model
