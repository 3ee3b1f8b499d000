"""Named choices are registered once: the config schema, the CLI and the code that runs them agree."""

from __future__ import annotations

import pytest

from wsiseg.choices import Choices
from wsiseg.errors import WsisegError


def test_choices_resolve_lazily_and_name_the_valid_ones() -> None:
    choices = Choices("colour", {"first": "wsiseg.errors:WsisegError", "second": "collections:OrderedDict"})
    assert list(choices) == ["first", "second"] and "second" in choices and "third" not in choices
    assert choices.load("first") is WsisegError
    with pytest.raises(WsisegError, match="unknown colour 'third': use one of first, second"):
        choices.load("third")


def test_fseg_modes_are_the_cli_choices_and_each_runs() -> None:
    import torch

    from wsiseg.cli.fseg import fseg_command
    from wsiseg.fseg.modes import MODES, concept_scores

    option = next(p for p in fseg_command.params if p.name == "mode")
    assert tuple(option.type.choices) == tuple(MODES) == ("project", "nearest", "nmf")
    torch.manual_seed(0)
    features, concepts = torch.rand(1, 6, 4, 4), torch.rand(3, 6)
    for mode in MODES:
        assert concept_scores(features, concepts, mode).shape == (1, 3, 4, 4), mode


def test_decoders_are_the_config_choices_and_build_their_class() -> None:
    from wsiseg.config import SCHEMA
    from wsiseg.models.choices import DECODERS
    from wsiseg.models.decoders import build_decoder

    assert SCHEMA["model"]["decoder"].choices == tuple(DECODERS) == ("fused", "progressive")
    for name in DECODERS:
        decoder = build_decoder(name, [8], [16], 3)
        assert type(decoder) is DECODERS.load(name) and type(decoder).__name__.lower().startswith(name)
