"""Checkpoints: save, reload to identical outputs (PFM weights rebuilt from the user's file), merge."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import wsiseg
from wsiseg.errors import WsisegError
from wsiseg.models import registry
from wsiseg.models.checkpoint import merge_checkpoint, save_checkpoint
from wsiseg.models.segmenter import build_segmenter

NAME = "timm:vit_tiny_patch16_224"
CLASSES = ["background", "tumour", "stroma"]


@pytest.fixture(scope="module")
def pfm_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'PFM weights' file of the tiny ViT, as a user would download one."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("pfm") / "pytorch_model.bin"
    torch.save(registry.create(NAME, "cpu", depth=2).state_dict(), path)
    return path


def trained(mode: str, pfm: Path | None) -> tuple[torch.nn.Module, dict]:
    """A segmenter trained two steps so that adapters and decoder are away from their init."""
    torch.manual_seed(0)
    config = {"model": {"name": NAME, "pfm_weights_path": None if pfm is None else str(pfm), "finetune_mode": mode,
                        "lora_r": 4, "lora_alpha": 8}, "dataset": {"class_names": CLASSES}}
    model = build_segmenter(config["model"], len(CLASSES), depth=2).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), config


def outputs(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(5)
    with torch.no_grad():
        return model(torch.rand(2, 3, 48, 32))


@pytest.mark.parametrize("mode", ["lora", "dora"])
def test_adapter_checkpoint_reloads_and_merges_to_identical_outputs(tmp_path: Path, pfm_file: Path, mode: str) -> None:
    model, config = trained(mode, pfm_file)
    expected = outputs(model)
    path = save_checkpoint(tmp_path / "best_model.pth", model, config, CLASSES, epoch=2, metrics={"mdice": 0.5})
    payload = torch.load(path, weights_only=True)
    assert payload["backbone_state"] == "adapter" and all("lora_" in k for k in payload["backbone"])
    assert payload["class_names"] == CLASSES and payload["extra"]["epoch"] == 2

    reloaded = wsiseg.load_segmenter(None, path, "cpu")
    assert not reloaded.training and reloaded.class_names == CLASSES
    torch.testing.assert_close(outputs(reloaded), expected, rtol=0, atol=0)

    moved = tmp_path / "elsewhere.bin"
    shutil.copy(pfm_file, moved)
    user_config = {"model": {"name": NAME, "pfm_weights_path": str(moved)}}
    torch.testing.assert_close(outputs(wsiseg.load_segmenter(user_config, path)), expected, rtol=0, atol=0)

    merged_path = merge_checkpoint(path, tmp_path / "merged.pth")
    merged_payload = torch.load(merged_path, weights_only=True)
    assert merged_payload["backbone_state"] == "full" and not any("lora_" in k for k in merged_payload["backbone"])
    moved.unlink()  # a merged export needs no PFM weights
    merged = wsiseg.load_segmenter({"model": {"pfm_weights_path": str(moved)}}, merged_path)
    torch.testing.assert_close(outputs(merged), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(WsisegError, match="already exists"):
        merge_checkpoint(path, merged_path)


@pytest.mark.parametrize("mode,stored", [("full", "full"), ("frozen", "none")])
def test_full_and_frozen_round_trip(tmp_path: Path, pfm_file: Path, mode: str, stored: str) -> None:
    model, config = trained(mode, pfm_file)
    path = save_checkpoint(tmp_path / "ckpt.pth", model, config, CLASSES)
    assert torch.load(path, weights_only=True)["backbone_state"] == stored
    torch.testing.assert_close(outputs(wsiseg.load_segmenter(None, path)), outputs(model), rtol=0, atol=0)


def test_random_backbone_is_stored_whole(tmp_path: Path) -> None:
    model, config = trained("lora", None)
    path = save_checkpoint(tmp_path / "ckpt.pth", model, config, CLASSES)
    assert torch.load(path, weights_only=True)["backbone_state"] == "full"
    torch.testing.assert_close(outputs(wsiseg.load_segmenter(None, path)), outputs(model), rtol=0, atol=0)


def test_bad_checkpoints_and_configs(tmp_path: Path, pfm_file: Path) -> None:
    with pytest.raises(WsisegError, match="checkpoint not found"):
        wsiseg.load_segmenter(None, tmp_path / "none.pth")
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(WsisegError, match="corrupt"):
        wsiseg.load_segmenter(None, tmp_path / "bad.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(WsisegError, match="not a wsiseg segmenter checkpoint"):
        wsiseg.load_segmenter(None, tmp_path / "foreign.pth")
    model, config = trained("frozen", pfm_file)
    path = save_checkpoint(tmp_path / "ckpt.pth", model, config, CLASSES)
    with pytest.raises(WsisegError, match="was trained with model.name = .* but the config has .uni_v1"):
        wsiseg.load_segmenter({"model": {"name": "uni_v1"}}, path)


def test_merge_config_file_is_validated(tmp_path: Path) -> None:
    model, config = trained("frozen", None)
    path = save_checkpoint(tmp_path / "ckpt.pth", model, config, CLASSES)
    (tmp_path / "syntax.yaml").write_text("model: {name: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- model\n- dataset\n")
    cases = (("syntax.yaml", "not valid YAML"), ("list.yaml", "must be a YAML mapping"), ("none.yaml", "does not exist"))
    for name, words in cases:
        with pytest.raises(WsisegError, match=words) as caught:
            merge_checkpoint(path, tmp_path / "merged.pth", config=tmp_path / name)
        assert "\n" not in str(caught.value)
    (tmp_path / "train.yaml").write_text(
        f"dataset: {{json: data.json, class_names: {CLASSES}}}\nmodel: {{name: '{NAME}', finetune_mode: frozen}}\n"
    )
    merged = merge_checkpoint(path, tmp_path / "merged.pth", config=tmp_path / "train.yaml")
    assert torch.load(merged, weights_only=True)["config"]["model"]["merged_from"] == "frozen"


def test_merge_of_a_config_without_finetune_mode_stores_the_backbone(tmp_path: Path, pfm_file: Path) -> None:
    """A stored config that leaves finetune_mode to its default (lora) still merges into a whole backbone."""
    model, config = trained("lora", pfm_file)
    del config["model"]["finetune_mode"]
    expected = outputs(model)
    path = save_checkpoint(tmp_path / "ckpt.pth", model, config, CLASSES)
    merged_path = merge_checkpoint(path, tmp_path / "merged.pth")
    merged_payload = torch.load(merged_path, weights_only=True)
    assert merged_payload["backbone_state"] == "full"
    assert merged_payload["config"]["model"]["merged_from"] == "lora"
    moved = tmp_path / "gone.bin"
    merged = wsiseg.load_segmenter({"model": {"pfm_weights_path": str(moved)}}, merged_path)
    torch.testing.assert_close(outputs(merged), expected, rtol=1e-5, atol=1e-5)


def test_one_rule_reconciles_a_config_with_a_checkpoint(tmp_path: Path, pfm_file: Path) -> None:
    """A stated model key must match (defaults filled in); a merged export also accepts its original mode."""
    from wsiseg.models.checkpoint import read_checkpoint, reconcile

    model, config = trained("lora", pfm_file)
    payload = read_checkpoint(save_checkpoint(tmp_path / "ckpt.pth", model, config, CLASSES))
    assert reconcile(payload, {"model": {"decoder": "fused", "pfm_weights_path": None}})["model"]["pfm_weights_path"] is None
    with pytest.raises(WsisegError, match="model.decoder = 'fused' but the config has 'progressive'"):
        reconcile(payload, {"model": {"decoder": "progressive"}})
    with pytest.raises(WsisegError, match="dataset.num_classes = 3 but the config has 4"):
        reconcile(payload, {"dataset": {"num_classes": 4}})
    merged = read_checkpoint(merge_checkpoint(tmp_path / "ckpt.pth", tmp_path / "merged.pth"))
    for mode in ("lora", "frozen"):
        assert reconcile(merged, {"model": {"name": NAME, "finetune_mode": mode}})["model"]["finetune_mode"] == "frozen"
    with pytest.raises(WsisegError, match="'frozen' or 'lora' but the config has 'full'"):
        reconcile(merged, {"model": {"finetune_mode": "full"}})


def test_a_disk_that_fills_during_a_save_is_the_os_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's zip writer turns a write failing part-way into its own RuntimeError ("unexpected pos ..."); the
    save raises the disk's OSError (which the CLI prints as one line) and leaves no file behind."""
    import errno
    import io

    import wsiseg.models.checkpoint as checkpoint

    class FillingFile(io.FileIO):
        """A file on a disk with 64 kB left."""

        def write(self, data: bytes) -> int:
            if self.tell() + len(data) > 65536:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(checkpoint, "open", lambda path, mode: FillingFile(path, mode), raising=False)
    config = {"model": {"name": NAME, "finetune_mode": "full", "input_size": 32, "depth": 2}}
    model = build_segmenter({"name": NAME, "finetune_mode": "full", "input_size": 32}, 2, depth=2)
    with pytest.raises(OSError) as error:
        save_checkpoint(tmp_path / "last.pth", model, config, ["a", "b"])
    assert error.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
