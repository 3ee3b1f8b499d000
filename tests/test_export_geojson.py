"""GeoJSON and overlay exports of a mask store: valid polygons with holes, seams dissolved, slide coordinates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import shape

from wsiseg.errors import WsisegError
from wsiseg.export import geojson
from wsiseg.export.geojson import _segments, absorb_small_regions, class_faces, coverage_faces, write_geojson
from wsiseg.export.geojson_text import number_bytes
from wsiseg.export.line_merge import merged_lines
from wsiseg.export.mask import export_mask
from wsiseg.slide.grid import Frame
from wsiseg.store.masks import MaskStore


def _labels() -> np.ndarray:
    labels = np.zeros((90, 70), np.uint8)
    labels[5:60, 5:40] = 1
    labels[15:30, 12:25] = 0  # a hole ...
    labels[18:22, 15:19] = 1  # ... with an island inside
    labels[62:85, 30:65] = 2
    labels[70:75, 40:50] = 1  # class 1 inside class 2: a hole of class 2
    return labels


def _store(path: Path, labels: np.ndarray) -> MaskStore:
    store = MaskStore.create(path, Frame(labels.shape[1], labels.shape[0], 2.0, 0.5, (100, 50)),
                             class_names=["bg", "tumour", "stroma"], chunk=32)
    store.write_rows(0, labels)
    store.finish()
    return store


def _blobby(height: int, width: int, seed: int) -> np.ndarray:
    """Irregular tissue-like regions of three classes plus small round 'nuclei' of a fourth."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((height, width)), 12)
    labels = np.digitize(field, np.quantile(field, [0.3, 0.6, 0.85])).astype(np.uint8)
    rows, cols = np.ogrid[:height, :width]
    for y, x, r in zip(rng.integers(0, height, 150), rng.integers(0, width, 150), rng.uniform(1.5, 5, 150)):
        labels[(rows - y) ** 2 + (cols - x) ** 2 <= r * r] = 4
    return labels


def _blobby_store(path: Path, labels: np.ndarray) -> MaskStore:
    store = MaskStore.create(path, Frame(labels.shape[1], labels.shape[0], 1.0, 0.25, (1000, 2000)),
                             class_names=["bg", "tumour", "stroma", "fat", "nuclei"], chunk=64)
    store.write_rows(0, labels)
    store.finish()
    return store


def _shapes(path: Path) -> tuple[list, list[str], list[dict]]:
    features = json.loads(path.read_text())["features"]
    return [shape(f["geometry"]) for f in features], [f["properties"]["classification"]["name"] for f in features], features


def _to_level_pixels(geometry, store: MaskStore, level: int):
    """Slide level-0 pixels back to pixels of a mask level (the inverse of the export's transform)."""
    scale = 2**level * store.mpp / store.slide_mpp
    return shapely.transform(geometry, lambda xy: (xy - np.asarray(store.origin)) / scale)


def test_faces_are_an_exact_coverage_whatever_the_bands() -> None:
    labels = _labels()
    whole, whole_labels = coverage_faces(labels, band_rows=1000)
    assert shapely.coverage_is_valid(whole)
    assert shapely.area(whole).sum() == labels.size  # no gaps, no overlaps over the whole raster
    for value in range(3):
        assert shapely.area(whole[whole_labels == value]).sum() == (labels == value).sum()  # exact pixel counts
    for band in (1, 7, 16):
        faces, values = coverage_faces(labels, band_rows=band)
        assert shapely.coverage_is_valid(faces) and len(faces) == len(whole)  # band seams leave no pieces
        for value in range(3):
            a, b = shapely.union_all(faces[values == value]), shapely.union_all(whole[whole_labels == value])
            assert shapely.symmetric_difference(a, b).area == 0


def _label_images() -> list[tuple[np.ndarray, int]]:
    """(labels, band rows): nested regions, blobs with small nuclei, and random small label noise."""
    rng = np.random.default_rng(7)
    noise = [(rng.integers(0, classes, (h, w)).astype(np.uint8), band)
             for classes, h, w, band in zip([1, 2, 3, 5, 4], [1, 9, 31, 40, 17], [1, 23, 8, 40, 33], [1024, 3, 7, 16, 1])]
    islands = np.zeros((40, 60), np.uint8)  # isolated loops of 4, 6, 8, ... segments once cut at the band seams
    for height in range(1, 9):
        islands[2 + 4 * (height % 2) : 2 + 4 * (height % 2) + height, 7 * height : 7 * height + 3] = 1 + height % 3
    return [(_labels(), 1000), (_labels(), 7), (_blobby(300, 260, seed=5), 64), (_blobby(600, 520, seed=4), 1024),
            (islands, 2), (islands, 3), *noise]


def _as_set(lines: np.ndarray) -> list[bytes]:
    """Lines as a sorted list of their normalised WKB (the same lines whatever their order, direction or start)."""
    return sorted(shapely.to_wkb(shapely.normalize(lines)).tolist())


def test_lines_merge_as_geos_merges_them() -> None:
    """The traced segments merge into the lines GEOS's line merge makes of them; with the GEOS this was written
    against (3.14), also in its order, direction and start points, so polygonize sees what it saw."""
    for labels, band in _label_images():
        start, stop, vertical = _segments(labels, band)
        segments = shapely.linestrings(np.stack([start, stop], axis=1).astype(np.float64))
        expected = shapely.get_parts(shapely.line_merge(shapely.multilinestrings(segments)))
        merged = merged_lines(start, stop, vertical)
        assert np.all(vertical == (start[:, 0] == stop[:, 0])) and np.all(stop >= start)
        assert _as_set(merged) == _as_set(expected)
        if shapely.geos_version[:2] == (3, 14):
            assert np.array_equal(shapely.get_coordinates(merged), shapely.get_coordinates(expected))


def test_numbers_are_written_as_their_repr() -> None:
    rng = np.random.default_rng(3)
    values = np.round(np.concatenate([rng.uniform(-5000, 5000, 5000), rng.uniform(-1, 1, 500), rng.uniform(0, 1e11, 50),
                                      [0.0, -0.0, -0.0004, 1.0, 999.0, 1000.0, 0.001, 0.5, 123456.789, 1e-5]]), 3)
    chars, keep = number_bytes(values)
    text, ends = chars[keep].tobytes().decode(), np.cumsum(keep.sum(axis=1)).tolist()
    assert [text[a:b] for a, b in zip([0, *ends], ends)] == [repr(value) for value in values.tolist()]
    with pytest.raises(WsisegError, match="beyond"):
        number_bytes(np.array([2e12]))


@pytest.mark.parametrize("simplify, min_area", [(0.0, 0.0), (0.3, 0.0), (0.0, 3.0)])
def test_written_text_is_json_of_the_polygons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, simplify: float,
                                              min_area: float) -> None:
    """Byte for byte what json.dumps writes of the features with shapely's `mapping` of each polygon, in runs or not."""
    labels = _blobby(200, 170, seed=8)
    store = MaskStore.create(tmp_path / "mask.zarr", Frame(170, 200, 0.25, 0.2493, (-30, 7.5)),
                             class_names=["bg", "tumour", "stroma", "fat", "nuclei"], chunk=64)
    store.write_rows(0, labels)
    store.finish()
    polygons, values, areas = class_faces(store, 0, simplify, min_area)
    features = [{"type": "Feature", "geometry": shapely.geometry.mapping(polygon),
                 "properties": {"objectType": "annotation",
                                "classification": {"name": store.class_names[value], "color": list(store.colors[value])},
                                "measurements": {"Area µm^2": round(float(area), 3)}}}
                for polygon, value, area in zip(polygons, values, areas)]
    expected = json.dumps({"type": "FeatureCollection", "features": features}, ensure_ascii=False)
    written = write_geojson(store, tmp_path / "mask.geojson", 0, simplify, min_area).read_text()
    assert written == expected and len(features) > 20
    monkeypatch.setattr(geojson, "VERTICES_PER_WRITE", 300)  # many runs, a few polygons alone in theirs
    assert write_geojson(store, tmp_path / "runs.geojson", 0, simplify, min_area).read_text() == expected
    assert shapely.get_num_coordinates(polygons).max() > 300
    assert any(x < 0 for polygon in polygons for x in shapely.get_coordinates(polygon)[:, 0])


def test_a_mask_of_background_alone_writes_no_features(tmp_path: Path) -> None:
    store = _store(tmp_path / "mask.zarr", np.zeros((40, 30), np.uint8))
    written = write_geojson(store, tmp_path / "mask.geojson").read_text()
    assert json.loads(written) == {"type": "FeatureCollection", "features": []}
    assert written == json.dumps(json.loads(written))


def test_geojson_export(tmp_path: Path) -> None:
    labels = _labels()
    store = _store(tmp_path / "mask.zarr", labels)
    out = export_mask(tmp_path / "mask.zarr", "geojson")
    assert out == tmp_path / "mask.geojson"
    geometries, names, features = _shapes(out)
    by_class: dict[str, list] = {}
    for geometry, name, feature in zip(geometries, names, features):
        assert geometry.is_valid and geometry.geom_type == "Polygon"
        assert shapely.is_ccw(geometry.exterior)  # RFC 7946
        properties = feature["properties"]
        assert properties["objectType"] == "annotation"
        assert properties["classification"]["color"] == list(store.colors[store.class_names.index(name)])
        # QuPath's area measurement, in µm² (slide pixels of 0.5 µm)
        assert properties["measurements"]["Area µm^2"] == pytest.approx(geometry.area * 0.25, rel=1e-6)
        by_class.setdefault(name, []).append(geometry)
    assert sorted(by_class) == ["stroma", "tumour"]
    assert len(by_class["tumour"]) == 3 and len(by_class["stroma"]) == 1
    assert sum(len(p.interiors) for p in by_class["tumour"]) == 1
    assert len(by_class["stroma"][0].interiors) == 1
    assert shapely.coverage_is_valid(np.array(geometries))
    # mask px -> slide level-0 px: x 4 (2.0 / 0.5 MPP), plus the bounds origin; rectangles stay exact
    stroma = by_class["stroma"][0]
    assert stroma.bounds == (100 + 30 * 4, 50 + 62 * 4, 100 + 65 * 4, 50 + 85 * 4)
    assert stroma.area == (labels == 2).sum() * 16
    with pytest.raises(WsisegError, match="already exists"):
        export_mask(tmp_path / "mask.zarr", "geojson")


@pytest.mark.parametrize("level", [None, 1])
def test_class_areas_match_the_mask_and_classes_never_overlap(tmp_path: Path, level: int | None) -> None:
    labels = _blobby(600, 520, seed=4)
    store = _blobby_store(tmp_path / "mask.zarr", labels)
    traced = store.level(level or 0)[:]
    factor = 4 ** (level or 0)  # level pixels in level-0 mask pixels
    exact_vertices = shapely.get_num_coordinates(coverage_faces(traced)[0]).sum()
    for simplify in (0.0, 1.0 * 2 ** (level or 0)):  # the default (off), and one traced pixel
        out = export_mask(tmp_path / "mask.zarr", "geojson", tmp_path / f"{simplify}.geojson", level=level,
                          simplify=simplify)
        geometries, names, features = _shapes(out)
        assert shapely.coverage_is_valid(np.array(geometries))
        union = shapely.union_all(geometries)
        assert union.area == pytest.approx(sum(g.area for g in geometries), rel=1e-9)  # no overlaps
        for index, name in enumerate(store.class_names[1:], start=1):
            area_um2 = sum(f["properties"]["measurements"]["Area µm^2"] for f, n in zip(features, names) if n == name)
            expected_um2 = (traced == index).sum() * factor * store.mpp**2
            if level is None:
                assert expected_um2 == store.pixel_counts[index] * store.mpp**2
            if simplify == 0:
                assert area_um2 == pytest.approx(expected_um2, rel=1e-9), name
            elif name != "nuclei":  # simplifying changes the area of regions a few pixels across most
                assert area_um2 == pytest.approx(expected_um2, rel=0.01), name
        vertices = sum(shapely.get_num_coordinates(geometries))
        assert vertices < (0.6 * exact_vertices if simplify else exact_vertices)


def test_unsimplified_polygons_fall_on_the_level_grid_and_rasterize_back(tmp_path: Path) -> None:
    from wsiseg.engine.evaluate import IGNORE, geojson_pair

    labels = _blobby(300, 260, seed=5)
    store = _blobby_store(tmp_path / "mask.zarr", labels)
    coarse = export_mask(tmp_path / "mask.zarr", "geojson", tmp_path / "level1.geojson", level=1)
    for geometry in _shapes(coarse)[0]:
        corners = shapely.get_coordinates(_to_level_pixels(geometry, store, 1))
        assert np.array_equal(corners, np.round(corners))  # exactly 2^L mask pixels per level-L pixel
    # read back by wsiseg eval's rasterizer (pixel centres), level 0's polygons are the mask
    prediction, target = geojson_pair(store, export_mask(tmp_path / "mask.zarr", "geojson"))
    annotated = target != IGNORE
    assert np.array_equal(prediction[annotated], target[annotated])
    assert annotated.sum() == (prediction > 0).sum()  # and every labelled pixel is annotated


def test_small_regions_take_the_label_they_share_most_edges_with() -> None:
    labels = np.ones((8, 10), np.uint8)
    labels[:, 6:] = 3
    labels[1:3, 1:3] = 2  # a 2x2 island inside class 1
    labels[5, 4:7] = 2  # 3 px: 5 edges with class 1, 3 with class 3
    labels[7, 0] = 2  # a corner pixel: 2 edges with class 1
    absorbed = absorb_small_regions(labels, min_pixels=5)
    expected = labels.copy()
    expected[1:3, 1:3] = 1
    expected[5, 4:7] = 1
    expected[7, 0] = 1
    assert np.array_equal(absorbed, expected)
    expected[1:3, 1:3] = 2  # at 4 px the island is large enough to stay
    assert np.array_equal(absorb_small_regions(labels, min_pixels=4), expected)


def test_min_area_merges_small_regions_into_their_neighbours(tmp_path: Path) -> None:
    labels = _blobby(400, 360, seed=6)
    _blobby_store(tmp_path / "mask.zarr", labels)
    out = export_mask(tmp_path / "mask.zarr", "geojson", simplify=0, min_area=40.0)
    geometries, names, _ = _shapes(out)
    assert shapely.coverage_is_valid(np.array(geometries))
    assert min(g.area for g in geometries) * 0.25**2 >= 40.0  # slide px of 0.25 µm
    nuclei = [g for g, n in zip(geometries, names) if n == "nuclei"]
    assert 0 < len(nuclei) < len(coverage_faces(labels)[0][coverage_faces(labels)[1] == 4])
    with pytest.raises(WsisegError, match="--level 9"):
        export_mask(tmp_path / "mask.zarr", "geojson", tmp_path / "x.geojson", level=9)


def test_overlay_and_tiff_exports(tmp_path: Path) -> None:
    import openslide

    labels = _labels()
    _store(tmp_path / "mask.zarr", labels)
    png = export_mask(tmp_path / "mask.zarr", "png", tmp_path / "o.png")
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] >= 90 and image.shape[1] > 70  # the mask plus a legend on its right
    tif = export_mask(tmp_path / "mask.zarr", "tiff")
    with openslide.OpenSlide(str(tif)) as slide:
        assert slide.dimensions == (256, 256)  # padded to one whole tile
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(2.0)
    with pytest.raises(WsisegError, match="format"):
        export_mask(tmp_path / "mask.zarr", "jpeg")
