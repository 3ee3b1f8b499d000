"""The one GeoJSON polygon reader: every container kind, shared by tissue masks and `wsiseg eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsiseg.errors import WsisegError
from wsiseg.polygons import geometry_polygons, load_features

SQUARE = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
TRIANGLE = [[[20, 0], [30, 0], [20, 10], [20, 0]]]


def test_every_geometry_kind_gives_its_polygons() -> None:
    nested = {"type": "GeometryCollection", "geometries": [
        {"type": "Polygon", "coordinates": SQUARE},
        {"type": "LineString", "coordinates": [[0, 0], [1, 1]]},
        {"type": "GeometryCollection", "geometries": [{"type": "MultiPolygon", "coordinates": [TRIANGLE, SQUARE]}]},
    ]}
    assert geometry_polygons(nested) == [SQUARE, TRIANGLE, SQUARE]
    assert geometry_polygons({"type": "Feature", "geometry": nested}) == [SQUARE, TRIANGLE, SQUARE]
    assert geometry_polygons({"type": "Point", "coordinates": [1, 2]}) == []
    assert geometry_polygons(None) == []


def test_documents_of_every_shape(tmp_path: Path) -> None:
    feature = {"type": "Feature", "properties": {"name": "a"}, "geometry": {"type": "Polygon", "coordinates": SQUARE}}
    for document, expected in (
        ({"type": "FeatureCollection", "features": [feature, feature]}, 2),
        ([feature], 1),
        (feature, 1),
        ({"type": "Polygon", "coordinates": SQUARE}, 1),
    ):
        (tmp_path / "a.geojson").write_text(json.dumps(document))
        features = load_features(tmp_path / "a.geojson", "fix it")
        assert len(features) == expected and geometry_polygons(features[0]) == [SQUARE]
    (tmp_path / "bad.geojson").write_text("{")
    with pytest.raises(WsisegError, match=r"bad\.geojson is not valid JSON .*: fix it"):
        load_features(tmp_path / "bad.geojson", "fix it")


def test_eval_reads_a_geometry_collection(tmp_path: Path) -> None:
    from wsiseg.engine.evaluate import IGNORE, geojson_pair
    from wsiseg.slide.grid import Frame
    from wsiseg.store.masks import MaskStore

    labels = np.zeros((40, 50), np.uint8)
    labels[:10, :10] = 1
    labels[:10, 20:30] = 1
    store = MaskStore.create(tmp_path / "mask.zarr", Frame(50, 40, 1.0, 1.0), class_names=["bg", "tumour"])
    store.write_rows(0, labels)
    store.finish()
    collection = {"type": "GeometryCollection", "geometries": [
        {"type": "Polygon", "coordinates": SQUARE}, {"type": "Polygon", "coordinates": [[[20, 0], [30, 0], [30, 10], [20, 10], [20, 0]]]}]}
    path = tmp_path / "regions.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"classification": {"name": "tumour"}}, "geometry": collection}]}))
    prediction, target = geojson_pair(MaskStore.open(tmp_path / "mask.zarr"), path)
    assert (target == 1).sum() == 200 and np.array_equal(prediction[target != IGNORE], target[target != IGNORE])
