"""The Segmenter module: output geometry, input checks, fine-tuning modes and LoRA coverage."""

from __future__ import annotations

import pytest
import torch

from wsiseg.errors import WsisegError
from wsiseg.models import registry
from wsiseg.models.features import token_features
from wsiseg.models.finetune import apply_finetune, trunk
from wsiseg.models.segmenter import build_segmenter

TINY = {"name": "timm:vit_tiny_patch16_224", "pfm_weights_path": None}


@pytest.mark.parametrize("decoder", ["fused", "progressive"])
@pytest.mark.parametrize("name,height,width,options", [
    ("timm:vit_tiny_patch16_224", 32, 80, {"depth": 4}),
    ("timm:vit_small_patch8_224", 24, 40, {"depth": 4}),
    ("timm:vit_small_patch14_dinov2", 42, 28, {"depth": 4}),
    ("timm:resnet18", 64, 96, {}),
])
def test_logits_at_input_size_for_each_patch(name: str, height: int, width: int, options: dict, decoder: str) -> None:
    config = {"name": name, "decoder": decoder, "finetune_mode": "frozen", "input_size": height}
    model = build_segmenter(config, 3, **options).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, height, width))
    assert logits.shape == (2, 3, height, width)
    assert torch.isfinite(logits).all()
    assert model.input_multiple == registry.get_spec(name).input_multiple


def test_input_not_multiple_of_patch_is_refused() -> None:
    model = build_segmenter({**TINY, "finetune_mode": "frozen"}, 2, depth=1)
    with pytest.raises(WsisegError, match="not a multiple of 16.*e.g. 32x48"):
        model(torch.rand(1, 3, 30, 50))
    with pytest.raises(WsisegError, match="model.input_size 220 is not a multiple of 14.*use 224"):
        build_segmenter({"name": "timm:vit_small_patch14_dinov2", "input_size": 220}, 2)


def test_emb_dim_disagreeing_with_model_is_refused() -> None:
    with pytest.raises(WsisegError, match="emb_dim is 1024 but timm:vit_tiny_patch16_224 has embed dim 192"):
        build_segmenter({**TINY, "emb_dim": 1024}, 2)
    assert build_segmenter({**TINY, "emb_dim": 192, "finetune_mode": "frozen"}, 2, depth=1).spec.embed_dim == 192


def test_bad_mode_and_decoder_names() -> None:
    with pytest.raises(WsisegError, match="finetune_mode 'qlora'"):
        build_segmenter({**TINY, "finetune_mode": "qlora"}, 2)
    with pytest.raises(WsisegError, match="decoder 'unet'"):
        build_segmenter({**TINY, "decoder": "unet"}, 2)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("mode", ["lora", "dora", "full", "frozen"])
def test_one_training_step_changes_only_intended_parameters(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="wsiseg"):
        model = build_segmenter({**TINY, "finetune_mode": mode, "lora_r": 4, "lora_alpha": 8}, 3, depth=3)
    assert "trainable" in caplog.text and "total" in caplog.text
    model.train()
    backbone_before, decoder_before = snapshot(model.backbone), snapshot(model.decoder)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x, y = torch.rand(2, 3, 32, 48), torch.randint(0, 3, (2, 32, 48))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    moved_backbone = changed(backbone_before, model.backbone)
    assert len(changed(decoder_before, model.decoder)) > 0.5 * len(decoder_before)
    adapters = {k for k in moved_backbone if "lora_" in k}
    base = moved_backbone - adapters
    if mode == "frozen":
        assert moved_backbone == set()
    elif mode == "full":
        assert len(base) > 0.9 * len(backbone_before)
    else:
        assert base == set()
        lora_b = {k for k in adapters if "lora_B" in k}
        assert len(lora_b) == 2 * 3  # qkv and proj of each of the 3 blocks
        if mode == "dora":
            assert any("lora_magnitude_vector" in k for k in adapters)


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_cnn_batchnorm_statistics_stay_unless_full(samples, mode: str) -> None:
    model = build_segmenter({"name": "efficientnet_lite0_imagenet", "finetune_mode": mode,
                             "lora_target_modules": ["conv_pwl"]}, 2).train()
    before = snapshot(model.backbone)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    moved = changed(before, model.backbone)
    assert all("lora_" in k for k in moved)
    assert (len(moved) > 0) == (mode == "lora")


@pytest.mark.parametrize("name", ["uni_v2", "phikon"])
def test_peft_wraps_real_size_models_on_meta(name: str) -> None:
    wrapped = apply_finetune(registry.create(name, "meta"), "lora", 8, 16, 0.0, ["qkv", "proj"])
    adapted = [n for n, m in trunk(wrapped).named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert len(adapted) == 2 * len(trunk(wrapped).blocks)
    assert all(p.requires_grad == ("lora_" in n) for n, p in wrapped.named_parameters())


@pytest.mark.usefixtures("sample_cache")  # builds efficientnet_lite0_imagenet
def test_lora_without_matching_targets_is_an_error() -> None:
    with pytest.raises(WsisegError, match="match no layer.*qkv"):
        build_segmenter({**TINY, "lora_target_modules": ["q_proj", "v_proj"]}, 2, depth=1)
    with pytest.raises(WsisegError, match="conv_pw"):
        build_segmenter({"name": "efficientnet_lite0_imagenet", "finetune_mode": "lora"}, 2)
    model = build_segmenter({"name": "efficientnet_lite0_imagenet", "finetune_mode": "lora",
                             "lora_target_modules": ["conv_pw", "conv_pwl"]}, 2)
    assert sum(p.numel() for n, p in model.backbone.named_parameters() if p.requires_grad and "lora_" in n) > 0


def test_token_features_drop_prefix_and_match_forward_features() -> None:
    torch.manual_seed(0)
    backbone = registry.create("timm:vit_small_patch14_reg4_dinov2", "cpu", depth=3).eval()
    x = torch.rand(2, 3, 42, 70)
    with torch.no_grad():
        grid = token_features(backbone, x)
        tokens = backbone.forward_features(x)[:, backbone.num_prefix_tokens:]
        normed = backbone.norm(grid.flatten(2).transpose(1, 2))
    assert grid.shape == (2, 384, 3, 5)
    torch.testing.assert_close(normed, tokens)
    assert token_features(backbone, x, layer=0).shape == (2, 384, 3, 5)
