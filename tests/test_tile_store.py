"""Tiling real slides into zarr tile stores: exact pixels, shapes at each MPP, resume, dask workers."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
import zarr
from PIL import Image

from tests.ome_zarr_check import validate, walk_without_warnings
from tests.real_cluster import real_cluster
from tests.test_slide_reader import CMU_SIZES, openslide_on_white
from wsiseg.errors import WsisegError
from wsiseg.outputs import TEMPORARY_GLOB, partial_path, temporary_sibling
from wsiseg.slide import open_slide
from wsiseg.store.masks import level_shapes
from wsiseg.store.tiles import TileStore
from wsiseg.store.tiling import TileSettings, tile_slide, tile_slides


def small_mask(tmp_path, x0=800, y0=1200, size=600):
    """GeoJSON square of tissue (level-0 pixels), to keep fine-MPP runs small."""
    ring = [[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size], [x0, y0]]
    path = tmp_path / "square.geojson"
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    return path


@pytest.fixture(scope="module")
def base_store(samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiles") / "cmu.zarr"
    return tile_slide(samples["cmu_svs"], out, 0.499, workers=0, progress=False)


def test_tissue_pixels_at_base_mpp_equal_openslide(base_store, samples):
    store = base_store
    assert store.is_complete and (store.width, store.height) == (2220, 2967)
    positions = store.tissue_tiles()
    assert 10 < len(positions) < 30  # CMU is about half background
    for x, y in positions:
        w, h = min(512, store.width - x), min(512, store.height - y)
        assert np.array_equal(store.read(x, y, w, h), openslide_on_white(samples["cmu_svs"], x, y, w, h)), (x, y)
    background = sorted(set(store.grid.positions()) - set(positions))
    assert background, "CMU has background tiles"
    for x, y in background:
        assert not store.chunk_file(x, y).exists()
        assert (store.read(x, y, 64, 64) == 255).all()


def test_store_is_self_describing(base_store, samples):
    store = base_store
    group = zarr.open_group(str(store.path), mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    multiscale = ome["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == ["c", "y", "x"]
    assert multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.499, 0.499]
    array = group["0"]
    assert array.shape == (3, 2967, 2220) and array.chunks == (3, 512, 512) and array.fill_value == 255
    assert array.shards is None
    assert store.source == samples["cmu_svs"].resolve()
    assert store.origin == (0, 0) and store.slide_mpp == pytest.approx(0.499)
    assert store.tissue.shape == (1024, 766) and 0.25 < store.tissue.fraction < 0.5
    assert store.attrs["grid"] == {"tile": 512, "rows": 6, "columns": 5, "tissue_tiles": len(store.tissue_tiles())}
    # the QC picture and the log live beside the store: inside, zarr would warn on every open
    assert store.qc_picture == store.path.with_name("cmu.qc.png")
    with Image.open(store.qc_picture) as picture:
        assert picture.size[0] > 500
    assert store.path.with_name("cmu.tile.log").read_text().count("tissue tiles") == 1
    assert walk_without_warnings(store.path)[:2] == ["0", "1"]


def test_store_is_a_valid_ome_zarr_pyramid(base_store):
    model = validate(base_store.path, "image")
    group = zarr.open_group(str(base_store.path), mode="r")
    shapes = level_shapes(base_store.height, base_store.width)
    assert len(model.attributes.ome.multiscales[0].datasets) == len(shapes) == 6
    for level, (height, width) in enumerate(shapes):
        assert group[str(level)].shape == (3, height, width)
        transforms = group.attrs["ome"]["multiscales"][0]["datasets"][level]["coordinateTransformations"]
        assert transforms[0]["scale"] == [1.0, 0.499 * 2**level, 0.499 * 2**level]
    # level 1 is the rounded 2x2 mean of level 0 (checked on a corner with tissue and white)
    level0 = np.asarray(group["0"][:, 1000:1200, 1000:1200]).astype(np.float64)
    mean = level0.reshape(3, 100, 2, 100, 2).mean(axis=(2, 4))
    assert np.abs(np.asarray(group["1"][:, 500:600, 500:600]) - mean).max() <= 0.5
    assert np.asarray(group["5"]).min() < 200  # tissue reaches the coarsest level


def test_store_reads_like_a_slide(base_store):
    store = pickle.loads(pickle.dumps(base_store))
    assert store.size_at(0.499) == (2220, 2967)
    window = store.read(2000, 2900, 300, 100, 0.499)
    assert window.shape == (100, 300, 3) and (window[67:] == 255).all() and (window[:, 220:] == 255).all()
    with pytest.raises(WsisegError, match="0.499 MPP, not 0.5"):
        store.read(0, 0, 10, 10, 0.5)
    assert tuple(store.bounds) == (0, 0, 2220, 2967)
    thumbnail = store.thumbnail(400)
    assert thumbnail.shape == (400, 299, 3)
    with open_slide(store.source) as slide:
        assert np.abs(thumbnail.astype(int) - slide.thumbnail(400)[:, :299]).mean() < 8


def test_glass_is_read_from_the_source_slide(base_store, samples, tmp_path):
    positions = set(base_store.tissue_tiles())
    glass = next((x, y) for y in range(0, base_store.height, 512) for x in range(0, base_store.width, 512)
                 if (x, y) not in positions and any((x + dx, y + dy) in positions for dx in (-512, 512) for dy in (0,)))
    x, y = max(glass[0] - 100, 0), glass[1]  # a box across a stored tile and a cell without one
    plain, through = base_store.read(x, y, 300, 200), base_store.with_glass_from_source().read(x, y, 300, 200)
    assert (plain == 255).all(axis=2).any() and not np.array_equal(plain, through)
    assert np.array_equal(through, openslide_on_white(samples["cmu_svs"], x, y, 300, 200))
    moved = tmp_path / "moved.zarr"  # a store whose slide is gone reads white there, as before
    shutil.copytree(base_store.path, moved)
    group = zarr.open_group(str(moved), mode="r+")
    group.attrs["wsiseg"] = {**group.attrs["wsiseg"], "source": str(tmp_path / "gone.svs")}
    alone = TileStore.open(moved).with_glass_from_source()
    assert not alone.glass_from_source and np.array_equal(alone.read(x, y, 300, 200), plain)
    copy = pickle.loads(pickle.dumps(base_store.with_glass_from_source()))  # reader threads' copies keep it
    assert copy.glass_from_source and np.array_equal(copy.read(x, y, 300, 200), through)
    copy.close()


@pytest.mark.parametrize("mpp", sorted(CMU_SIZES))
def test_store_shape_at_each_mpp(samples, tmp_path, mpp, caplog):
    with caplog.at_level(logging.WARNING, logger="wsiseg"):
        store = tile_slide(samples["cmu_svs"], tmp_path / "s.zarr", mpp, tile=256, workers=0, progress=False,
                           tissue_mask_path=small_mask(tmp_path))
    width, height = CMU_SIZES[mpp]
    assert (store.width, store.height) == (width, height)
    assert store.array.shape == (3, height, width)
    assert ("upsampling" in caplog.text) == (mpp < 0.499)
    positions = store.tissue_tiles()
    assert positions and all(store.chunk_file(x, y).exists() for x, y in positions)
    x, y = positions[len(positions) // 2]
    with open_slide(samples["cmu_svs"]) as slide:
        assert np.array_equal(store.read(x, y, 64, 64), slide.read(x, y, 64, 64, mpp))


def test_resume_writes_only_missing_chunks(samples, tmp_path):
    out = tmp_path / "cmu.zarr"
    first = tile_slide(samples["cmu_svs"], out, 1.0, tile=128, workers=0, progress=False)
    expected = np.asarray(first.array[...])
    positions = first.tissue_tiles()
    # Simulate an interrupted run: back to the partial name, not complete, 3 chunks missing, 1 cut short.
    partial = partial_path(out)
    out.rename(partial)
    group = zarr.open_group(str(partial), mode="r+")
    group.attrs["wsiseg"] = {**group.attrs["wsiseg"], "complete": False}
    store = TileStore.open(partial)
    lost = positions[:3]
    for x, y in lost:
        store.chunk_file(x, y).unlink()
    cut = store.chunk_file(*positions[3])
    cut.write_bytes(cut.read_bytes()[:1000])
    kept = {p: store.chunk_file(*p).stat().st_mtime_ns for p in positions[4:]}
    leftover = temporary_sibling(cut)  # a temporary chunk of a killed writer
    leftover.write_bytes(b"partial")

    resumed = tile_slide(samples["cmu_svs"], out, 1.0, tile=128, workers=0, progress=False)
    assert resumed.is_complete and not partial.exists()
    assert not list(out.rglob(TEMPORARY_GLOB))
    assert np.array_equal(np.asarray(resumed.array[...]), expected)
    assert {p: resumed.chunk_file(*p).stat().st_mtime_ns for p in kept} == kept
    assert "4 to write" in out.with_name("cmu.tile.log").read_text()


def test_existing_and_mismatched_outputs(samples, tmp_path):
    out = tmp_path / "s.zarr"
    kwargs = {"workers": 0, "progress": False}
    first = tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, **kwargs)
    stamps = {p: first.chunk_file(*p).stat().st_mtime_ns for p in first.tissue_tiles()}
    same = tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, **kwargs)  # finished with these settings: kept
    assert same.is_complete and {p: same.chunk_file(*p).stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(WsisegError, match="already exists and holds other settings.*--overwrite"):
        tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, tile=256, **kwargs)
    again = tile_slide(samples["cmu_pyramid_tiff"], out, 8.0, overwrite=True, **kwargs)
    assert again.is_complete and again.mpp == 8.0
    # a partial store of another run is not silently mixed in
    other = tmp_path / "o.zarr"
    tile_slide(samples["cmu_pyramid_tiff"], other, 4.0, **kwargs).path.rename(partial_path(other))
    with pytest.raises(WsisegError, match="other settings"):
        tile_slide(samples["cmu_pyramid_tiff"], other, 8.0, **kwargs)
    assert not other.exists()


def test_another_tissue_request_is_not_the_same_store(samples, tmp_path):
    out, roi = tmp_path / "s.zarr", small_mask(tmp_path)
    kwargs = {"workers": 0, "progress": False}
    detected = tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, **kwargs).tissue.fraction
    with pytest.raises(WsisegError, match=r"already exists and holds other settings \(--tissue\).*--overwrite"):
        tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, tissue="all", **kwargs)
    everything = tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, tissue="all", overwrite=True, **kwargs)
    assert everything.tissue.fraction == 1.0 > detected
    assert tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, tissue="all", **kwargs).tissue.fraction == 1.0
    # a mask file is one request as long as the file is unchanged; an edited mask is another
    square = tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, tissue=roi, overwrite=True, **kwargs).tissue.fraction
    assert tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, tissue=roi, **kwargs).is_complete
    roi.write_text(small_mask(tmp_path, size=900).read_text())
    os.utime(roi, ns=(1, 1))
    with pytest.raises(WsisegError, match=r"\(--tissue\)"):
        tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, tissue=roi, **kwargs)
    # an interrupted run is resumed only with its own tissue request
    out.rename(partial_path(out))
    with pytest.raises(WsisegError, match=r"interrupted run with other settings \(--tissue\)"):
        tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, **kwargs)
    assert 0 < square < detected


def test_store_tiled_before_tissue_requests_were_recorded_is_reused(samples, tmp_path):
    out = tmp_path / "s.zarr"
    kwargs = {"workers": 0, "progress": False}
    store = tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, **kwargs)
    stamps = {p: store.chunk_file(*p).stat().st_mtime_ns for p in store.tissue_tiles()}
    group = zarr.open_group(str(out), mode="r+")
    group.attrs["wsiseg"] = {k: v for k, v in group.attrs["wsiseg"].items() if k != "tissue_request"}
    reused = tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, **kwargs)  # detected then, detected now
    assert {p: reused.chunk_file(*p).stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(WsisegError, match=r"\(--tissue\)"):
        tile_slide(samples["cmu_pyramid_tiff"], out, 4.0, tissue="all", **kwargs)


def test_no_tissue_gives_an_empty_complete_store(tmp_path, caplog):
    Image.fromarray(np.full((400, 600, 3), 250, np.uint8)).save(tmp_path / "blank.png")
    with caplog.at_level(logging.WARNING, logger="wsiseg"):
        store = tile_slide(tmp_path / "blank.png", tmp_path / "blank.zarr", 0.5, slide_mpp=0.5, tile=128,
                           workers=0, progress=False)
    assert "no tissue" in caplog.text
    assert store.is_complete and store.tissue_tiles() == [] and (store.width, store.height) == (600, 400)
    assert not (store.path / "0" / "c").exists()
    assert (store.read(0, 0, 600, 400) == 255).all()


@pytest.mark.slow
def test_dask_workers_write_every_chunk(samples, tmp_path):
    store = tile_slide(samples["cmu_svs"], tmp_path / "d.zarr", 0.5, tile=256, workers=2, progress=False)
    positions = store.tissue_tiles()
    assert len(positions) > 40
    assert all(store.chunk_file(x, y).exists() for x, y in positions)
    with open_slide(samples["cmu_svs"]) as slide:
        assert np.array_equal(store.read(0, 0, store.width, store.height),
                              _tissue_only(slide.read(0, 0, store.width, store.height, 0.5), positions, 256))


@pytest.mark.slow
def test_existing_scheduler_with_two_workers(samples, tmp_path):
    with real_cluster(tmp_path / "cluster", workers=2) as address:
        store = tile_slide(samples["cmu_pyramid_tiff"], tmp_path / "s.zarr", 1.0, tile=128, scheduler=address,
                           progress=False)
    positions = store.tissue_tiles()
    assert len(positions) > 30 and len(store.stored_tiles(positions)) == len(positions)
    with open_slide(samples["cmu_pyramid_tiff"]) as slide:
        for x, y in positions:
            w, h = min(128, store.width - x), min(128, store.height - y)
            assert np.array_equal(store.read(x, y, w, h), slide.read(x, y, w, h, 1.0)), (x, y)


def _tissue_only(image: np.ndarray, positions, tile: int) -> np.ndarray:
    out = np.full_like(image, 255)
    for x, y in positions:
        out[y : y + tile, x : x + tile] = image[y : y + tile, x : x + tile]
    return out


def test_several_slides_and_skip_errors(samples, tmp_path):
    slides = [samples["cmu_pyramid_tiff"], samples["unreadable_svs"]]
    with pytest.raises(WsisegError, match="corrupt"):
        tile_slides(slides, tmp_path / "a", 4.0, workers=0, progress=False)
    assert not any((tmp_path / "a").glob("*.zarr"))  # checked before any tiling
    results = tile_slides(slides, tmp_path / "b", 4.0, workers=0, progress=False, skip_errors=True)
    assert [r.status for r in results] == ["done", "failed"]
    assert TileStore.open(tmp_path / "b" / "cmu_pyramid.zarr").is_complete
    assert "corrupt" in results[1].message and not (tmp_path / "b" / "unreadable_svs.zarr").exists()
    with pytest.raises(WsisegError, match="names one output"):
        tile_slides(slides, tmp_path / "x.zarr", 4.0, workers=0)


def test_negative_workers_is_a_user_error(samples, tmp_path):
    options = {"out": tmp_path / "out", "mpp": 8, "tile": 64, "workers": -1, "progress": False}
    with pytest.raises(WsisegError, match="--workers must be 0 or more"):
        tile_slide(samples["cmu_svs"], **options)
    with pytest.raises(WsisegError, match="--workers must be 0 or more"):
        tile_slides([samples["cmu_svs"]], **options)
    small, misspelt = {**options, "workers": 0, "tile": 8}, {**options, "workers": 0, "tiles": 64}
    with pytest.raises(WsisegError, match="--tile must be at least 16"):
        tile_slide(samples["cmu_svs"], **small)
    with pytest.raises(WsisegError, match="--tile must be at least 16"):  # checked for several slides too
        tile_slides([samples["cmu_svs"]], **small)
    with pytest.raises(TypeError, match="unknown tiling options: tiles"):
        tile_slides([samples["cmu_svs"]], **misspelt)
    settings = TileSettings.of(tile=64, workers=0, tissue_mask_path=None)
    assert settings == TileSettings(tile=64, workers=0) and TileSettings.of(settings, tissue="all").tissue == "all"
    assert list(tmp_path.iterdir()) == []


def test_retiling_in_process_with_another_tile_size(samples, tmp_path):
    out = tmp_path / "t.zarr"
    tile_slide(samples["cmu_svs"], out, 8, tile=64, workers=0, progress=False)
    tile_slide(samples["cmu_svs"], out, 8, tile=32, workers=0, overwrite=True, progress=False)
    store = TileStore.open(out)
    assert store.tile == 32 and store.is_complete
    positions = store.tissue_tiles()
    assert positions and len(store.stored_tiles(positions)) == len(positions)
    with open_slide(samples["cmu_svs"]) as slide:
        for x, y in positions:
            w, h = min(32, store.width - x), min(32, store.height - y)
            assert np.array_equal(store.read(x, y, w, h), slide.read(x, y, w, h, 8)), (x, y)


def test_worker_slide_cache_is_bounded_and_closes_what_it_drops(samples, tmp_path):
    import os
    import shutil

    from wsiseg.store.tiles import SlideCache

    cache = SlideCache(size=2)
    copies = [shutil.copy(samples["small_svs"], tmp_path / f"s{i}.svs") for i in range(3)]
    slides = [open_slide(path) for path in copies]
    for slide in slides:
        with cache.use(slide) as reader:
            assert reader is slide
            reader.read(0, 0, 8, 8, slide.mpp)
    assert slides[0]._backend is None  # dropped and closed
    assert slides[1]._backend is not None and slides[2]._backend is not None
    with cache.use(open_slide(copies[2])) as reader:
        assert reader is slides[2]  # same file: the open handle is reused
    stat = os.stat(copies[2])
    os.utime(copies[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    replaced = open_slide(copies[2])
    with cache.use(replaced) as reader:
        assert reader is replaced  # a file replaced at the same path is not served from a stale handle
    assert slides[1]._backend is None
