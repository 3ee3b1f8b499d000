"""Named choices are registered once: the config schema, the CLI and the code that runs them agree."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import wsiseg
from wsiseg.choices import Choices, either
from wsiseg.engine.choices import BLENDS, PREDICTION_MODES
from wsiseg.errors import WsisegError
from wsiseg.export.choices import DEFAULT_EXPORTS, EXPORTS, LABELS
from wsiseg.fseg.modes import MODES as FSEG_MODES
from wsiseg.models.choices import DECODERS, FINETUNE_MODES
from wsiseg.train.choices import LOSSES, OPTIMIZERS, SCHEDULERS

PACKAGE = Path(wsiseg.__file__).parent
# every registry of the package, by where it is defined
REGISTRIES = {
    "wsiseg.engine.choices:BLENDS": BLENDS,
    "wsiseg.engine.choices:PREDICTION_MODES": PREDICTION_MODES,
    "wsiseg.export.choices:EXPORTS": EXPORTS,
    "wsiseg.fseg.modes:MODES": FSEG_MODES,
    "wsiseg.models.choices:DECODERS": DECODERS,
    "wsiseg.models.choices:FINETUNE_MODES": FINETUNE_MODES,
    "wsiseg.train.choices:LOSSES": LOSSES,
    "wsiseg.train.choices:OPTIMIZERS": OPTIMIZERS,
    "wsiseg.train.choices:SCHEDULERS": SCHEDULERS,
}


def _trees() -> dict[str, ast.Module]:
    """The parsed source of every module of the package, by module name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _words(items: list[ast.expr | None]) -> set[str] | None:
    """The strings of a literal whose items are all string constants (None otherwise)."""
    if not items or not all(isinstance(item, ast.Constant) and isinstance(item.value, str) for item in items):
        return None
    return {item.value for item in items}


def test_choices_resolve_lazily_and_name_the_valid_ones() -> None:
    choices = Choices("colour", {"first": "wsiseg.errors:WsisegError", "second": ("collections:OrderedDict", "od")})
    assert list(choices) == ["first", "second"] and choices.names == ("first", "second")
    assert "second" in choices and "third" not in choices and choices["second"] == "collections:OrderedDict"
    assert choices.load("first") is WsisegError
    assert (choices.detail("first"), choices.detail("second")) == (None, "od")
    for method in (choices.load, choices.detail, choices.check):
        with pytest.raises(WsisegError, match="unknown colour 'third': use one of first, second"):
            method("third")


def test_either_writes_names_as_prose() -> None:
    assert [either(names) for names in (["a"], ["a", "b"], "abc")] == ["a", "a or b", "a, b or c"]


def test_the_list_of_registries_is_complete() -> None:
    found = {f"{module}:{target.id}"
             for module, tree in _trees().items() for node in ast.walk(tree) if isinstance(node, ast.Assign)
             and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "Choices"
             for target in node.targets if isinstance(target, ast.Name)}
    assert found == set(REGISTRIES)


@pytest.mark.parametrize("where", sorted(REGISTRIES))
def test_every_entry_resolves_to_a_callable(where: str) -> None:
    registry = REGISTRIES[where]
    assert len(registry) >= 2
    for name in registry:
        target = registry.load(name)
        assert callable(target), f"{where} {name} -> {registry[name]} is not callable"
        assert registry[name].endswith(":" + target.__name__)


@pytest.mark.parametrize("where", sorted(REGISTRIES))
def test_no_module_types_a_registrys_names_again(where: str) -> None:
    """No tuple, list, set or dict literal of exactly a registry's names, and no prose listing them, outside the
    registry's own module."""
    registry, home = REGISTRIES[where], where.split(":")[0]
    prose = (", ".join(registry), either(registry))
    retyped = []
    for module, tree in _trees().items():
        if module == home:
            continue
        for node in ast.walk(tree):
            items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and _words(items) == set(registry):
                retyped.append(f"{module}:{node.lineno}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and any(p in node.value for p in prose):
                retyped.append(f"{module}:{node.lineno}")
    assert retyped == [], f"{where} names typed again at {retyped}"


def test_config_choices_are_the_registries() -> None:
    from wsiseg.config import SCHEMA

    assert SCHEMA["model"]["decoder"].choices == DECODERS.names == ("fused", "progressive")
    assert SCHEMA["model"]["finetune_mode"].choices == FINETUNE_MODES.names == ("lora", "dora", "full", "frozen")
    assert SCHEMA["training"]["optimizer"].choices == OPTIMIZERS.names == ("sgd", "adam", "adamw")
    assert SCHEMA["training"]["scheduler"].choices == SCHEDULERS.names == ("cosine", "step", "poly", "none")
    assert SCHEMA["validation"]["mode"].choices == PREDICTION_MODES.names == ("windowslide", "resize")
    assert SCHEMA["validation"]["blend"].choices == BLENDS.names == ("gaussian", "constant")
    for section, key, registry in (("model", "decoder", DECODERS), ("model", "finetune_mode", FINETUNE_MODES),
                                   ("training", "optimizer", OPTIMIZERS), ("training", "scheduler", SCHEDULERS)):
        assert SCHEMA[section][key].default in registry


def test_the_validator_accepts_exactly_the_registered_losses() -> None:
    from wsiseg.config import validate_config

    raw = {"dataset": {"json": "x.json", "num_classes": 2}, "model": {"name": "efficientnet_lite0_imagenet"}}
    config = validate_config({**raw, "training": {"loss": dict.fromkeys(LOSSES, 1.0)}}, check_files=False)
    assert [name for name in config["training"]["loss"] if name in LOSSES] == list(LOSSES)
    with pytest.raises(WsisegError) as error:
        validate_config({**raw, "training": {"loss": {"tversky": 1.0}}}, check_files=False)
    assert f"unknown loss 'training.loss.tversky'; losses: {', '.join(LOSSES)}" in str(error.value)


def test_cli_choices_are_the_registries() -> None:
    from wsiseg.cli.fseg import fseg_command
    from wsiseg.cli.segment import export_command, segment_command
    from wsiseg.cli.train import infer_command

    def option(command, name):
        return next(p for p in command.params if p.name == name)

    assert tuple(option(fseg_command, "mode").type.choices) == FSEG_MODES.names == ("project", "nearest", "nmf")
    assert list(option(export_command, "fmt").type.choices) == [*EXPORTS, LABELS]
    for command in (segment_command, infer_command):
        assert tuple(option(command, "mode").type.choices) == PREDICTION_MODES.names
        assert tuple(option(command, "blend").type.choices) == BLENDS.names
    assert option(segment_command, "exports").default == ",".join(DEFAULT_EXPORTS) == "tiff,ome-tiff,png"
    assert set(DEFAULT_EXPORTS) <= set(EXPORTS)
    assert ", ".join(EXPORTS) in option(segment_command, "exports").help
    assert either(map(EXPORTS.detail, EXPORTS)) in option(export_command, "out").help


def test_a_runs_outputs_are_named_by_the_export_registry(tmp_path: Path) -> None:
    from wsiseg.engine.run import output_paths

    paths = output_paths(tmp_path, list(EXPORTS))
    assert {fmt: paths[fmt] for fmt in EXPORTS} == {fmt: tmp_path / EXPORTS.detail(fmt) for fmt in EXPORTS}
    assert len({path.name for path in paths.values()}) == len(paths)
    with pytest.raises(WsisegError, match=f"unknown export format 'jpeg': use any of {', '.join(EXPORTS)}$"):
        output_paths(tmp_path, ["jpeg"])


def test_unknown_finetune_mode_names_the_registered_ones() -> None:
    from wsiseg.models.segmenter import model_config

    with pytest.raises(WsisegError, match="unknown model.finetune_mode 'adapter': use one of lora, dora, full, frozen"):
        model_config({"name": "efficientnet_lite0_imagenet", "finetune_mode": "adapter"})


def test_registries_and_the_cli_import_no_torch() -> None:
    code = ("import sys, wsiseg.config_types, wsiseg.cli.segment, wsiseg.cli.fseg, wsiseg.cli.train\n"
            "print(sorted(m for m in ('torch', 'timm', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_decoders_build_their_class() -> None:
    from wsiseg.models.decoders import build_decoder

    for name in DECODERS:
        decoder = build_decoder(name, [8], [16], 3)
        assert type(decoder) is DECODERS.load(name) and type(decoder).__name__.lower().startswith(name)


def test_each_fseg_mode_runs() -> None:
    import torch

    from wsiseg.fseg.modes import concept_scores

    torch.manual_seed(0)
    features, concepts = torch.rand(1, 6, 4, 4), torch.rand(3, 6)
    for mode in FSEG_MODES:
        assert concept_scores(features, concepts, mode).shape == (1, 3, 4, 4), mode


def test_each_finetune_mode_sets_what_trains() -> None:
    import torch

    from wsiseg.models.finetune import apply_finetune, count_parameters

    def backbone() -> torch.nn.Module:
        model = torch.nn.Module()
        model.blocks = torch.nn.Sequential(torch.nn.Linear(4, 4))
        return model

    trainable = {mode: count_parameters(apply_finetune(backbone(), mode, targets=["0"]))[0] for mode in FINETUNE_MODES}
    assert trainable["full"] == 20 and trainable["frozen"] == 0
    assert trainable["lora"] == 8 * 4 * 2  # A (8x4) and B (4x8) at rank 8
    assert trainable["dora"] == trainable["lora"] + 4  # and one magnitude per output
