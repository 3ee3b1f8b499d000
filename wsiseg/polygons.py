"""Polygons out of GeoJSON files: the one reader for tissue masks and class annotations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wsiseg.errors import WsisegError

Rings = list[list[list[float]]]  # a polygon: its exterior ring, then its holes


def load_features(path: Path, fix: str) -> list[dict[str, Any]]:
    """The features of a FeatureCollection, a lone Feature or geometry, or a list of features.

    A file that is not JSON raises a WsisegError naming the file and ending with `fix`.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise WsisegError(f"{path} is not valid JSON ({error}): {fix}") from None
    if isinstance(document, list):
        return [feature for feature in document if isinstance(feature, dict)]
    if not isinstance(document, dict):
        return []
    if document.get("type") == "FeatureCollection" or "features" in document:
        return [feature for feature in document.get("features", []) if isinstance(feature, dict)]
    return [document]


def geometry_polygons(geometry: dict[str, Any] | None) -> list[Rings]:
    """The polygons of a Feature or geometry: Polygon, MultiPolygon and GeometryCollection parts; no lines or points."""
    if not isinstance(geometry, dict):
        return []
    kind = geometry.get("type")
    if kind == "Feature":
        return geometry_polygons(geometry.get("geometry"))
    if kind == "Polygon":
        return [geometry["coordinates"]] if geometry.get("coordinates") else []
    if kind == "MultiPolygon":
        return [polygon for polygon in geometry.get("coordinates", []) if polygon]
    if kind == "GeometryCollection":
        return [polygon for part in geometry.get("geometries", []) for polygon in geometry_polygons(part)]
    return []
