"""The backbone registry: every REFERENCE §1 entry, built on the meta device, against the reference facts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import assert_user_error, run_cli
from wsiseg.cli import main
from wsiseg.errors import WsisegError
from wsiseg.models import registry

# name: (embed dim, patch, prefix tokens, trunk parameters in millions) from REFERENCE §1
REFERENCE = {
    "uni_v1": (1024, 16, 1, 303.35),
    "uni_v2": (1536, 14, 9, 681.39),
    "conch_v1": (768, 16, 1, 86.25),
    "conch_v1_5": (1024, 16, 1, 303.0),
    "virchow_v1": (1280, 14, 1, 631.23),
    "virchow_v2": (1280, 14, 5, 631.24),
    "phikon": (768, 16, 1, 85.80),
    "phikon_v2": (1024, 16, 1, 303.0),
    "hoptimus_0": (1536, 14, 5, 1134.77),
    "hoptimus_1": (1536, 14, 5, 1134.77),
    "gigapath": (1536, 16, 1, 1134.95),
    "midnight12k": (1536, 14, 1, 1134.8),
    "kaiko-vits8": (384, 8, 1, 21.7),
    "kaiko-vits16": (384, 16, 1, 21.7),
    "kaiko-vitb8": (768, 8, 1, 85.8),
    "kaiko-vitb16": (768, 16, 1, 85.8),
    "kaiko-vitl14": (1024, 14, 5, 303.23),
    "lunit_vits8": (384, 8, 1, 21.67),
    "hibou_l": (1024, 14, 5, 303.2),
    "musk": (1024, 16, 1, 303.94),  # REFERENCE gives no count: the vision expert of BEiT-3 L/16 at 384, built here
    "pathorchestra": (1024, 16, 1, 303.35),
    "patho3dmatrix-vision": (1024, 16, 1, 303.35),
}
NORMS = {
    "conch_v1": registry.CLIP, "uni_v1": registry.IMAGENET, "kaiko-vitl14": registry.HALF,
    "midnight12k": registry.HALF, "hoptimus_1": registry.HOPTIMUS, "lunit_vits8": registry.LUNIT,
    "hibou_l": registry.HIBOU, "musk": registry.HALF,
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_spec_matches_reference(name: str) -> None:
    dim, patch, prefix, millions = REFERENCE[name]
    spec = registry.get_spec(name)
    assert (spec.embed_dim, spec.patch_size, spec.num_prefix_tokens, spec.input_multiple) == (dim, patch, prefix, patch)
    assert abs(spec.params / 1e6 - millions) / millions < 0.01, spec.params
    assert spec.kind == "vit"


@pytest.mark.parametrize("name", registry.names())
def test_declared_facts_equal_the_meta_build(name: str) -> None:
    """What `wsiseg models` prints without building (the registry's declared facts) is what a build shows."""
    assert registry.declared_spec(name) == registry.get_spec(name)


def test_models_listing_imports_no_torch() -> None:
    """`wsiseg models` reads declared facts only: neither torch nor timm is imported (it answers instantly)."""
    code = ("import sys, io, contextlib; from wsiseg.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try: main(['models', '--json'])\n"
            "    except SystemExit: pass\n"
            "assert 'uni_v2' in out.getvalue(), out.getvalue()\n"
            "print(sorted(m for m in ('torch', 'timm', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_normalisations() -> None:
    for name, (mean, std) in NORMS.items():
        spec = registry.get_spec(name)
        assert (spec.mean, spec.std) == (mean, std)


def test_every_reference_name_registered() -> None:
    assert set(REFERENCE) | {"efficientnet_lite0_imagenet"} == set(registry.names())


def test_unknown_names_suggest_closest() -> None:
    with pytest.raises(WsisegError, match="did you mean .*hoptimus_0"):
        registry.get_spec("hoptimus0")
    with pytest.raises(WsisegError, match="timm:vit_tiny_patch16_224"):
        registry.get_spec("timm:vit_tiny_patch16_22")


def test_timm_models_vit_and_cnn() -> None:
    vit = registry.get_spec("timm:vit_small_patch14_reg4_dinov2")
    assert (vit.kind, vit.embed_dim, vit.patch_size, vit.num_prefix_tokens) == ("vit", 384, 14, 5)
    cnn = registry.get_spec("timm:resnet18")
    assert cnn.kind == "cnn" and cnn.feature_strides == (2, 4, 8, 16, 32) and cnn.input_multiple == 32
    assert cnn.feature_dims[-1] == 512


def test_efficientnet_spec() -> None:
    spec = registry.get_spec("efficientnet_lite0_imagenet")
    assert spec.kind == "cnn" and spec.feature_dims == (16, 24, 40, 112, 320) and spec.mean == (0.5, 0.5, 0.5)
    assert abs(spec.params - 2_960_000) < 20_000  # the trunk without conv_head and classifier


def test_meta_build_holds_no_data() -> None:
    model = registry.build_backbone("hoptimus_0")
    assert all(p.is_meta for p in model.parameters())


def test_models_json_cli_lists_every_name(capsys: pytest.CaptureFixture) -> None:
    main(["models", "--json"])  # in-process: the same command a user runs, without a second interpreter
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(registry.names())
    for name, (dim, patch, prefix, millions) in REFERENCE.items():
        row = rows[name]
        assert (row["embed_dim"], row["patch_size"], row["num_prefix_tokens"]) == (dim, patch, prefix)
        assert abs(row["params"] / 1e6 - millions) / millions < 0.01
        assert len(row["mean"]) == len(row["std"]) == 3


def test_merge_cli_missing_checkpoint_is_one_line_error(tmp_path) -> None:
    assert_user_error(run_cli("merge", tmp_path / "none.pth", "--out", tmp_path / "m.pth"), "checkpoint not found")


def test_models_table(capsys: pytest.CaptureFixture) -> None:
    main(["models"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["name", "dim", "patch", "prefix"]
    assert any(line.split()[:6] == ["musk", "1024", "16", "1", "16", "303.94M"] for line in lines)
    assert any(line.split()[:6] == ["uni_v2", "1536", "14", "9", "14", "681.39M"] for line in lines)
