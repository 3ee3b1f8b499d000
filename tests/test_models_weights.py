"""Loading backbone weights from local files: layouts, wrappers, prefixes, remaps and refusals."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wsiseg.errors import WsisegError
from wsiseg.models import registry, weights
from wsiseg.models.finetune import find_targets
from wsiseg.models.weights import load_backbone_weights

TINY = "timm:vit_tiny_patch16_224"
VITS = [n for n in registry.names() if n not in ("musk", "efficientnet_lite0_imagenet")]


def wrapped_variants(state: dict) -> dict[str, dict]:
    """The ways users' checkpoints wrap and prefix a state dict."""
    return {
        "plain": state,
        "model": {"model": state, "epoch": 3},
        "state_dict+module": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "teacher+backbone": {"teacher": {**{f"backbone.{k}": v for k, v in state.items()},
                                         "head.mlp.0.weight": torch.zeros(2, 2)}, "student": {}},
        "open_clip": {**{f"visual.trunk.{k}": v for k, v in state.items()}, "text.proj": torch.zeros(2),
                      "visual.attn_pool.q": torch.zeros(2)},
    }


@pytest.mark.parametrize("name", VITS)
def test_real_size_state_dict_fits_on_meta_and_lora_finds_targets(name: str) -> None:
    """A state dict of the real-size trunk, wrapped or prefixed, fits the loader's skeleton (no data),
    and LoRA's default targets (attention qkv and proj) exist in every block."""
    target = registry.create(name, "meta")
    depth = len(target.blocks)
    assert len(find_targets(target, ["qkv", "proj"])) == 2 * depth
    assert len(find_targets(target, ["qkv", "proj", "fc1", "fc2"])) == 4 * depth
    expected = target.state_dict()
    for label, variant in wrapped_variants(dict(expected)).items():
        state = weights.strip_prefixes(weights.unwrap(variant))
        weights.check_fit(state, expected, label, name)
    target.load_state_dict(state, strict=True, assign=True)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return registry.create(TINY, "cpu", depth=2).eval()


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_tiny_round_trip_each_format_and_wrapper(tmp_path: Path, suffix: str) -> None:
    model = tiny_model()
    x = torch.rand(1, 3, 32, 48)
    expected = model.forward_features(x)
    for label, variant in wrapped_variants(model.state_dict()).items():
        path = tmp_path / f"{label}{suffix}"
        if suffix == ".safetensors":
            if label != "plain":
                continue
            save_file({k: v.contiguous() for k, v in variant.items()}, str(path))
        else:
            torch.save(variant, path)
        loaded = load_backbone_weights(TINY, path, depth=2).eval()
        assert not any(p.is_meta for p in loaded.parameters())
        torch.testing.assert_close(loaded.forward_features(x), expected, rtol=0, atol=0)


def test_half_precision_checkpoint_loads_as_float32(tmp_path: Path) -> None:
    model = tiny_model()
    torch.save(model.half().state_dict(), tmp_path / "fp16.pth")
    assert load_backbone_weights(TINY, tmp_path / "fp16.pth", depth=2).pos_embed.dtype == torch.float32


def test_positional_grid_size_read_from_checkpoint(tmp_path: Path) -> None:
    torch.save(registry.create(TINY, "cpu", depth=2, img_size=448).state_dict(), tmp_path / "w.pth")
    model = load_backbone_weights(TINY, tmp_path / "w.pth", depth=2)
    assert model.pos_embed.shape[1] == 1 + 28 * 28


def test_other_architecture_lists_the_problems(tmp_path: Path) -> None:
    torch.save(registry.create("timm:vit_small_patch16_224", "cpu", depth=2).state_dict(), tmp_path / "small.pth")
    with pytest.raises(WsisegError) as error:
        load_backbone_weights(TINY, tmp_path / "small.pth", depth=3)
    message = str(error.value)
    assert "missing (blocks.2." in message and "shape mismatches" in message and "pos_embed" in message


def test_unexpected_keys_are_refused(tmp_path: Path) -> None:
    state = tiny_model().state_dict()
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(WsisegError, match="1 unexpected \\(extra.weight\\)"):
        load_backbone_weights(TINY, tmp_path / "extra.pth", depth=2)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(WsisegError, match="weights not found"):
        load_backbone_weights(TINY, tmp_path / "nope.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WsisegError, match="corrupt"):
        load_backbone_weights(TINY, tmp_path / "bad.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WsisegError, match="corrupt"):
        load_backbone_weights(TINY, tmp_path / "bad.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WsisegError, match="no weights file"):
        load_backbone_weights(TINY, tmp_path / "empty")


def test_random_init_only_when_asked_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="wsiseg"):
        model = registry.build_backbone("kaiko-vits16", None, device="cpu")
    assert not any(p.is_meta for p in model.parameters())
    assert "randomly initialised" in caplog.text


transformers = pytest.importorskip("transformers")


def hf_cases() -> dict:
    """Tiny Hugging Face models (random weights) and the timm arguments of the same architecture."""
    from timm.layers import SwiGLUPacked

    common = dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, image_size=64, patch_size=16)
    layerscale = dict(depth=2, init_values=1e-5)
    return {
        "ViTModel": (lambda: transformers.ViTModel(transformers.ViTConfig(intermediate_size=768, **common)),
                     dict(depth=2, norm_layer=partial(torch.nn.LayerNorm, eps=1e-12))),
        "Dinov2Model": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(**common)), layerscale),
        "Dinov2Model-swiglu": (
            lambda: transformers.Dinov2Model(transformers.Dinov2Config(use_swiglu_ffn=True, **common)),
            dict(layerscale, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=1024 / 192)),
        "Dinov2WithRegisters": (
            lambda: transformers.Dinov2WithRegistersModel(
                transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **common)),
            dict(layerscale, reg_tokens=4, no_embed_class=True)),
    }


@pytest.mark.parametrize("case", ["ViTModel", "Dinov2Model", "Dinov2Model-swiglu", "Dinov2WithRegisters"])
def test_hf_directory_remap_gives_identical_tokens(tmp_path: Path, case: str) -> None:
    make, timm_args = hf_cases()[case]
    torch.manual_seed(0)
    hf = make().eval()
    for parameter in hf.parameters():
        parameter.data.normal_(0, 0.05)
    hf.save_pretrained(tmp_path / "folder")  # the hub's file layout
    torch.save(hf.state_dict(), tmp_path / "memory.pth")  # transformers 5 in-memory names
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        for source in (tmp_path / "folder", tmp_path / "memory.pth"):
            model = load_backbone_weights(TINY, source, **timm_args).eval()
            torch.testing.assert_close(model.forward_features(x), expected, atol=1e-5, rtol=1e-5)


HF_REAL = {
    "phikon": lambda t: t.ViTModel(t.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                               intermediate_size=3072, image_size=224, patch_size=16)),
    "phikon_v2": lambda t: t.Dinov2Model(t.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                        image_size=224, patch_size=16)),
    "midnight12k": lambda t: t.Dinov2Model(t.Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                                                          image_size=224, patch_size=14, use_swiglu_ffn=True)),
    "hibou_l": lambda t: t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14,
        num_register_tokens=4)),
}


@pytest.mark.parametrize("name", sorted(HF_REAL))
def test_hf_layout_of_real_size_fits_registry_entry(name: str, tmp_path: Path) -> None:
    """The Hugging Face layout of each HF-format PFM, built on meta at real size, remaps onto its entry."""
    with torch.device("meta"):
        hf = HF_REAL[name](transformers)
    state = weights.strip_prefixes(weights.unwrap(hf.state_dict()))
    target = registry.create(name, "meta")
    remapped = weights.remap_hf(state, target)
    weights.check_fit(remapped, target.state_dict(), "hf", name)


def sharded_vit(folder: Path) -> tuple[torch.nn.Module, dict]:
    """A tiny random ViTModel saved by transformers in shards of at most 200 kB, and the timm arguments to load it."""
    _, timm_args = hf_cases()["ViTModel"]
    torch.manual_seed(1)
    hf = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=64,
        patch_size=16)).eval()
    hf.save_pretrained(folder, max_shard_size="200KB")
    return hf, {**timm_args, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2, "depth": 3}


def test_sharded_safetensors_folder_index_and_shard_paths_load(tmp_path: Path) -> None:
    hf, timm_args = sharded_vit(tmp_path / "hf")
    shards = sorted((tmp_path / "hf").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        for source in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors.index.json", shards[1]):
            model = load_backbone_weights(TINY, source, **timm_args).eval()
            torch.testing.assert_close(model.forward_features(x), expected, atol=1e-5, rtol=1e-5)


def test_sharded_pytorch_bin_folder_loads(tmp_path: Path) -> None:
    """The same shards as torch pickles with a pytorch_model.bin.index.json, a folder transformers itself loads."""
    import json

    from safetensors.torch import load_file

    hf, timm_args = sharded_vit(tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    folder = tmp_path / "bin"
    folder.mkdir()
    renamed = {name: name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
               for name in set(index["weight_map"].values())}
    for name, new in renamed.items():
        torch.save(load_file(str(tmp_path / "hf" / name)), folder / new)
    index["weight_map"] = {key: renamed[name] for key, name in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        reloaded = transformers.ViTModel.from_pretrained(folder).eval()
        torch.testing.assert_close(reloaded(pixel_values=x).last_hidden_state, expected, atol=0, rtol=0)
        model = load_backbone_weights(TINY, folder, **timm_args).eval()
        torch.testing.assert_close(model.forward_features(x), expected, atol=1e-5, rtol=1e-5)


def test_incomplete_shard_sets_are_refused(tmp_path: Path) -> None:
    _, timm_args = sharded_vit(tmp_path / "hf")
    shards = sorted((tmp_path / "hf").glob("model-*-of-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(WsisegError, match=f"{shards[-1].name}.*download the missing shards"):
        load_backbone_weights(TINY, tmp_path / "hf", **timm_args)
    (tmp_path / "hf" / "model.safetensors.index.json").unlink()
    with pytest.raises(WsisegError, match="not their index"):
        load_backbone_weights(TINY, tmp_path / "hf", **timm_args)
    with pytest.raises(WsisegError, match="one shard of .* no model.safetensors.index.json"):
        load_backbone_weights(TINY, shards[0], **timm_args)


def tiny_hf_pfms() -> dict:
    """Tiny random models of each HF-format PFM's own class, and the registry overrides that shrink the entry alike."""
    common = dict(num_hidden_layers=2, num_attention_heads=4, image_size=224)
    t = transformers
    return {
        "phikon": (lambda: t.ViTModel(t.ViTConfig(hidden_size=64, intermediate_size=256, patch_size=16, **common),
                                      add_pooling_layer=False), dict(embed_dim=64)),
        "phikon_v2": (lambda: t.Dinov2Model(t.Dinov2Config(hidden_size=64, patch_size=16, **common)), dict(embed_dim=64)),
        "midnight12k": (lambda: t.Dinov2Model(t.Dinov2Config(hidden_size=96, patch_size=14, use_swiglu_ffn=True,
                                                             **common)), dict(embed_dim=96)),
        "hibou_l": (lambda: t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(
            hidden_size=64, patch_size=14, num_register_tokens=4, **common)), dict(embed_dim=64)),
    }


@pytest.mark.parametrize("name", sorted(tiny_hf_pfms()))
def test_off_grid_tokens_equal_the_checkpoints_own_code(name: str, tmp_path: Path) -> None:
    """Position grids resampled as the PFM's own Hugging Face class does (plain bicubic for ViTModel and
    Dinov2Model, antialiased for Dinov2WithRegisters): tokens equal transformers' on and off the native grid."""
    make, overrides = tiny_hf_pfms()[name]
    torch.manual_seed(0)
    hf = make().eval()
    for parameter in hf.parameters():
        parameter.data.normal_(0, 0.05)
    hf.save_pretrained(tmp_path / name)
    model = load_backbone_weights(name, tmp_path / name, depth=2, num_heads=4, **overrides).eval()
    extra = {"interpolate_pos_encoding": True} if isinstance(hf, transformers.ViTModel) else {}
    patch = model.patch_embed.patch_size[0]
    for side in (224 // patch * patch, 448, 512 // patch * patch):  # 224, 448, 512 px to the patch multiple below
        x = torch.randn(1, 3, side, side)
        with torch.no_grad():
            expected = hf(pixel_values=x, **extra).last_hidden_state
            torch.testing.assert_close(model.forward_features(x), expected, atol=2e-5, rtol=1e-5, msg=f"{name} at {side}")
