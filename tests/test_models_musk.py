"""MUSK's vision tower against torchscale's BEiT3 (the implementation MUSK is built on), loading and LoRA."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.oracles import oracle_site
from wsiseg.config import load_config
from wsiseg.errors import WsisegError
from wsiseg.models import registry
from wsiseg.models.finetune import trunk
from wsiseg.models.segmenter import build_segmenter
from wsiseg.models.registry import load_backbone_weights

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "musk.yaml"
TINY = dict(img_size=64, embed_dim=64, depth=2, num_heads=4)  # MuskVision arguments of a tiny MUSK
def _unpack_torchscale(scratch: Path, site: Path) -> None:
    with zipfile.ZipFile(next(scratch.glob("torchscale-*.whl"))) as wheel:
        wheel.extractall(site)
    with tarfile.open(next(scratch.glob("fairscale-*.tar.gz"))) as sdist:
        sdist.extractall(scratch, filter="data")
    (scratch / "fairscale-0.4.0" / "fairscale").rename(site / "fairscale")


def _fetch_torchscale() -> Path:
    """torchscale 0.3.0 (no dependencies) and fairscale 0.4.0's source, unpacked once into the oracle cache."""
    return oracle_site("torchscale-0.3.0", [["torchscale==0.3.0"], ["--no-binary", ":all:", "fairscale==0.4.0"]],
                       _unpack_torchscale)


@pytest.fixture(scope="module")
def torchscale_beit3():
    """torchscale's BEiT3 class and config, imported from the cache folder; skips when they cannot be had."""
    try:
        folder = _fetch_torchscale()
    except (subprocess.SubprocessError, OSError, StopIteration) as error:
        pytest.skip(f"torchscale 0.3.0 (the MUSK oracle) cannot be downloaded here: {type(error).__name__}")
    sys.path.insert(0, str(folder))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torchscale imports timm.models.layers
            from torchscale.architecture.config import EncoderConfig
            from torchscale.model.BEiT3 import BEiT3
    except ImportError as error:
        pytest.skip(f"torchscale 0.3.0 does not import with this torch/timm: {error}")
    finally:
        sys.path.remove(str(folder))
    return BEiT3, EncoderConfig


def musk_config(EncoderConfig, img_size: int = 64, embed_dim: int = 64, depth: int = 2, heads: int = 4):
    """MUSK's published encoder settings (multiway, sub-LN, output norm, no output layer), sized down for tests."""
    return EncoderConfig(img_size=img_size, patch_size=16, vocab_size=64010 if embed_dim == 1024 else 100,
                         multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True,
                         encoder_embed_dim=embed_dim, encoder_attention_heads=heads,
                         encoder_ffn_embed_dim=4 * embed_dim, encoder_layers=depth)


def published_checkpoint(beit3: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as MUSK publishes it: `beit3.` over torchscale's names, plus the retrieval heads."""
    dim = beit3.args.encoder_embed_dim
    return {**{f"beit3.{k}": v for k, v in beit3.state_dict().items()},
            "vision_head.weight": torch.randn(dim, dim), "language_head.weight": torch.randn(dim, dim),
            "logit_scale": torch.tensor(2.65)}


def random_beit3(BEiT3, EncoderConfig, **sizes) -> torch.nn.Module:
    torch.manual_seed(0)
    model = BEiT3(musk_config(EncoderConfig, **sizes)).eval()
    for parameter in model.parameters():  # move every weight off its init, both experts included
        parameter.data.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.mark.slow
def test_tokens_equal_torchscale_beit3_through_the_config(torchscale_beit3, tmp_path: Path) -> None:
    """A torchscale-built MUSK checkpoint, in both published forms, loads through configs/musk.yaml and
    gives torchscale's tokens (class and patch tokens, last block after the final norm)."""
    BEiT3, EncoderConfig = torchscale_beit3
    oracle = random_beit3(BEiT3, EncoderConfig)
    checkpoint = published_checkpoint(oracle)
    torch.save({"model": checkpoint}, tmp_path / "musk.pth")
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(tmp_path / "model.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = oracle(visual_tokens=x)["encoder_out"]
    for weights in ("musk.pth", "model.safetensors"):
        config = load_config(CONFIG, check_files=False, options=[f"model.pfm_weights_path={tmp_path / weights}"])
        model = build_segmenter(config["model"], 2, **TINY).eval()
        with torch.no_grad():
            tokens = trunk(model.backbone).forward_features(x)
            maps = trunk(model.backbone).forward_intermediates(x, [-1], norm=True, intermediates_only=True)[0]
        torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(maps.flatten(2).transpose(1, 2), expected[:, 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_off_grid_positions_resampled_as_musks_loader_does(torchscale_beit3, tmp_path: Path) -> None:
    """At 96 px, tokens equal torchscale's BEiT3 built for 96 px holding the 64 px table resampled by plain
    bicubic (what MUSK's load_model_and_may_interpolate does: class and unused rows kept, grid resampled)."""
    BEiT3, EncoderConfig = torchscale_beit3
    small = random_beit3(BEiT3, EncoderConfig)
    torch.save(published_checkpoint(small), tmp_path / "musk.pth")
    state = small.state_dict()
    table = state["encoder.embed_positions.A.weight"]
    grid = table[3:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    state["encoder.embed_positions.A.weight"] = torch.cat([table[:3], grid.permute(0, 2, 3, 1).reshape(36, -1)])
    large = BEiT3(musk_config(EncoderConfig, img_size=96)).eval()
    large.load_state_dict(state)
    model = load_backbone_weights("musk", tmp_path / "musk.pth", **TINY).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), large(visual_tokens=x)["encoder_out"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_published_layout_at_real_size_fits(torchscale_beit3) -> None:
    """MUSK's real encoder (ViT-L/16 at 384, vocab 64010), built by torchscale on the meta device, fits the entry."""
    from wsiseg.models import musk, weights

    BEiT3, EncoderConfig = torchscale_beit3
    with torch.device("meta"):
        real = BEiT3(musk_config(EncoderConfig, img_size=384, embed_dim=1024, depth=24, heads=16))
    state = musk.remap_published(weights.strip_prefixes(weights.unwrap({"model": published_checkpoint(real)})), "meta")
    target = registry.create("musk", "meta")
    weights.check_fit(state, target.state_dict(), "meta", "musk")
    assert target.pos_embed.shape == (1, 1 + 24 * 24, 1024)


def test_other_layouts_are_refused(tmp_path: Path) -> None:
    torch.save(registry.create("timm:vit_tiny_patch16_224", "cpu", depth=2).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(WsisegError, match="not a MUSK checkpoint.*published layout.*beit3.encoder.layers.0"):
        load_backbone_weights("musk", tmp_path / "vit.pth", **TINY)


def as_published(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This module's state dict written back in MUSK's published layout (vision expert only)."""
    renamed = {"cls_token": "vision_embed.cls_token", "patch_embed.proj.weight": "vision_embed.proj.weight",
               "patch_embed.proj.bias": "vision_embed.proj.bias", "norm.weight": "encoder.layer_norm.A.weight",
               "norm.bias": "encoder.layer_norm.A.bias"}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            index, rest = key.split(".", 2)[1:]
            part, leaf = rest.rsplit(".", 1)
            expert = f"ffn.A.{part.removeprefix('ffn.')}" if part.startswith("ffn.") else f"{part}.A"
            key = f"encoder.layers.{index}.{expert}.{leaf}"
        elif key == "pos_embed":
            key, value = "encoder.embed_positions.A.weight", torch.cat([torch.zeros(2, value.shape[-1]), value[0]])
        else:
            key = renamed[key]
        state[f"beit3.{key}"] = value
    return state


def test_an_incomplete_musk_checkpoint_lists_what_is_missing(tmp_path: Path) -> None:
    """The layout is right but a layer is absent: the strict load names it."""
    model = registry.create("musk", "cpu", **TINY).eval()
    state = as_published(model)
    torch.save(state, tmp_path / "full.pth")
    loaded = load_backbone_weights("musk", tmp_path / "full.pth", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), model.forward_features(x), atol=0, rtol=0)
    del state["beit3.encoder.layers.1.ffn.A.fc2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(WsisegError, match=r"1 missing \(blocks.1.ffn.fc2.weight\)"):
        load_backbone_weights("musk", tmp_path / "partial.pth", **TINY)


def test_lora_checkpoint_reloads_and_merges(tmp_path: Path) -> None:
    """A MUSK LoRA segmenter saved as adapters reloads from the user's MUSK file and merges to the same outputs."""
    import wsiseg
    from wsiseg.models.checkpoint import merge_checkpoint, save_checkpoint

    torch.manual_seed(3)
    torch.save({"model": as_published(registry.create("musk", "cpu", **TINY))}, tmp_path / "musk.pth")
    config = {"model": {"name": "musk", "pfm_weights_path": str(tmp_path / "musk.pth"), "input_size": 64,
                        "finetune_mode": "lora"},
              "dataset": {"class_names": ["a", "b"]}}
    model = build_segmenter(config["model"], 2, **TINY)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.rand(2, 3, 64, 64)
    for _ in range(2):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.randint(0, 2, (2, 64, 64))).backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    path = save_checkpoint(tmp_path / "best_model.pth", model, config, ["a", "b"], epoch=1, metrics={})
    with torch.no_grad():
        torch.testing.assert_close(wsiseg.load_segmenter(None, path)(x), expected, atol=0, rtol=0)
        merged = wsiseg.load_segmenter(None, merge_checkpoint(path, tmp_path / "merged.pth"))
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_lora_with_the_config_default_targets_adapts_every_block_and_training_moves_tokens() -> None:
    """The config default [qkv, proj] names no MUSK layer; the registry's MUSK targets (q, k, v, out
    projections) are used instead, adapters sit in every block, and a few training steps move the tokens."""
    torch.manual_seed(0)
    model = build_segmenter({"name": "musk", "input_size": 64}, 3, **TINY)
    backbone = trunk(model.backbone)
    adapted = sorted(n for n, m in backbone.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0)
    assert len(adapted) == 4 * TINY["depth"]
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert {n.split(".")[1] for n in adapted} == {str(i) for i in range(TINY["depth"])}
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = torch.rand(2, 3, 64, 64)
    labels = torch.randint(0, 3, (2, 64, 64))
    base = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        before = backbone.forward_features((x - 0.5) / 0.5)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        after = backbone.forward_features((x - 0.5) / 0.5)
    assert (after - before).abs().max() > 1e-3
    assert all(torch.equal(p, base[n]) for n, p in model.backbone.named_parameters() if n in base)


def test_musk_spec_and_fixed_normalisation() -> None:
    spec = registry.get_spec("musk")
    assert (spec.embed_dim, spec.patch_size, spec.num_prefix_tokens, spec.mean, spec.std) == (
        1024, 16, 1, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    skeleton = registry.create("musk", "meta")
    assert skeleton.patch_embed.grid_size == (24, 24) and len(skeleton.blocks) == 24


def test_intermediates_match_a_run_of_the_blocks() -> None:
    """forward_intermediates gives each requested block's tokens (optionally normed) as maps, in block order."""
    torch.manual_seed(0)
    model = registry.create("musk", "cpu", **{**TINY, "depth": 3}).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        tokens, _ = model.embed(x)
        outputs = []
        for block in model.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        maps = model.forward_intermediates(x, [0, -1], intermediates_only=True)
        final, normed = model.forward_intermediates(x, 1, norm=True, output_fmt="NLC")
    assert [tuple(m.shape) for m in maps] == [(2, 64, 4, 6)] * 2
    for got, block_out in zip(maps, (outputs[0], outputs[2])):
        torch.testing.assert_close(got.flatten(2).transpose(1, 2), block_out[:, 1:], atol=0, rtol=0)
    torch.testing.assert_close(final, model.norm(outputs[2]), atol=0, rtol=0)
    torch.testing.assert_close(normed[0], model.norm(outputs[2])[:, 1:], atol=0, rtol=0)
