"""Run settings: one frozen object, defaults written once, checked once, shared by the CLI and the API."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import numpy as np
import pytest
from PIL import Image

import wsiseg
from tests.train_fixtures import save_tiny_vit
from wsiseg.engine.segment import load_predictor
from wsiseg.engine.settings import RunSettings
from wsiseg.errors import WsisegError
from wsiseg.fseg.options import DEFAULT_BATCH_SIZE, FsegOptions, fseg_request


def click_defaults(command: click.Command) -> dict[str, object]:
    context = click.Context(command)
    return {param.name: param.get_default(context) for param in command.params}


def test_cli_defaults_are_the_settings_defaults() -> None:
    from wsiseg.cli.fseg import fseg_command, fseg_fit_command
    from wsiseg.cli.segment import segment_command

    fields = {field.name: field.default for field in dataclasses.fields(RunSettings)}
    segment = click_defaults(segment_command)
    for name in ("mode", "mpp", "slide_mpp", "window", "overlap", "blend", "batch_size", "device", "workers",
                 "clip_to_tissue", "tissue", "save_probabilities", "background", "overwrite"):
        assert segment[name] == fields[name], name
    assert tuple(segment["exports"].split(",")) == RunSettings.exports
    fseg = click_defaults(fseg_command)
    assert fseg["batch_size"] == DEFAULT_BATCH_SIZE != RunSettings.batch_size  # F-Seg's one own default
    for name in ("overlap", "device", "workers", "clip_to_tissue", "tissue"):
        assert fseg[name] == fields[name], name
    assert (fseg["k"], fseg["mode"]) == (FsegOptions.k, FsegOptions.mode)
    assert click_defaults(fseg_fit_command)["seed"] == FsegOptions.seed
    # a call without options runs with what the command line runs with
    settings, options = fseg_request(None, None, {})
    assert settings == RunSettings(batch_size=DEFAULT_BATCH_SIZE) and options == FsegOptions()


@pytest.mark.parametrize(("options", "message"), [
    ({"overlap": 1.0}, r"--overlap must be a fraction of the window in \[0, 1\), got 1.0"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"workers": -1}, "--workers must be 0 or more"),
    ({"workers": "many"}, "--workers must be a number or auto, got 'many'"),
    ({"mpp": -0.5}, "--mpp must be a positive number, got -0.5"),
    ({"slide_mpp": float("nan")}, "--slide-mpp must be a positive number"),
    ({"window": 0}, "--window must be at least 1 pixel, got 0"),
    ({"mode": "tiles"}, "unknown mode 'tiles': use windowslide or resize"),
    ({"blend": "max"}, "unknown blend 'max': use gaussian or constant"),
    ({"tissue": "mask.txt"}, "--tissue mask.txt: use auto"),
    ({"exports": ("tiff", "bmp")}, "unknown export format 'bmp'"),
])
def test_a_bad_value_is_refused_when_the_settings_are_built(options: dict, message: str) -> None:
    with pytest.raises(WsisegError, match=message):
        RunSettings(**options)
    with pytest.raises(WsisegError, match=message):
        RunSettings().replace(**options)


def test_unknown_names_are_refused_before_anything_is_read(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.svs"
    with pytest.raises(WsisegError, match="unknown option windw: use any of .*window"):
        wsiseg.segment_slide(missing, tmp_path / "none.pth", tmp_path / "out", windw=256)
    with pytest.raises(WsisegError, match="unknown option kk: use any of .*k, "):
        wsiseg.fseg_slide(missing, tmp_path / "out", kk=4)
    with pytest.raises(WsisegError, match="unknown option overlp"):
        wsiseg.run_slide(missing, None, tmp_path / "out", overlp=0.5)
    with pytest.raises(WsisegError, match="unknown options bar, foo"):
        RunSettings.build(foo=1, bar=2)
    with pytest.raises(WsisegError, match="unknown --mode 'sum'"):
        FsegOptions(mode="sum")
    with pytest.raises(WsisegError, match="--k must be a positive integer, got 0"):
        wsiseg.fseg_slide(missing, tmp_path / "out", k=0)
    assert not (tmp_path / "out").exists()


def test_settings_are_frozen_and_overrides_make_a_copy() -> None:
    base = RunSettings(mpp=2.0, exports=["tiff"])
    assert base.exports == ("tiff",)  # normalised to a tuple: hashable, equal however it was given
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.mpp = 1.0  # type: ignore[misc]
    changed = RunSettings.build(base, overlap=0.5)
    assert (changed.overlap, changed.mpp, base.overlap) == (0.5, 2.0, 0.25)
    assert RunSettings.build(base) is base


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("model") / "tiny.pth", ["background", "tumour", "stroma"], 4.0)


@pytest.fixture(scope="module")
def tissue_png(samples: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = np.asarray(Image.open(samples["hgsc_image"]).convert("RGB"))[400:560, 300:460].copy()
    path = tmp_path_factory.mktemp("png") / "he.png"
    Image.fromarray(image).save(path)
    return path


def test_one_settings_object_serves_several_runs_with_overrides(checkpoint: Path, tissue_png: Path,
                                                                tmp_path: Path) -> None:
    settings = RunSettings(mpp=2.0, slide_mpp=2.0, window=64, workers=0, device="cpu", exports=(),
                           show_progress=False)
    first = wsiseg.segment_slide(tissue_png, checkpoint, tmp_path / "a", settings)
    second = wsiseg.segment_slide(tissue_png, checkpoint, tmp_path / "b", settings, overlap=0.5, batch_size=3)
    assert (first["overlap"], first["stride"], first["batch_size"]) == (0.25, 48, 16)
    assert (second["overlap"], second["stride"], second["batch_size"]) == (0.5, 32, 3)
    assert second["windows_total"] > first["windows_total"]
    recorded = json.loads((tmp_path / "a" / "summary.json").read_text())["fingerprint"]
    assert (recorded["mpp"], recorded["window"], recorded["background"], recorded["exports"]) == (2.0, 64, 0, [])
    # the same request again is the finished run, reused
    assert wsiseg.segment_slide(tissue_png, checkpoint, tmp_path / "a", settings)["reused"] is True
    with pytest.raises(WsisegError, match="needs an MPP and a window"):
        wsiseg.run_slide(tissue_png, load_predictor(checkpoint, device="cpu")[0],
                         tmp_path / "c", settings.replace(window=None))
