"""The README's example commands name real commands and options (tools/check_readme.py runs them)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from wsiseg.cli import COMMANDS, cli

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[list[str]]:
    """Every `wsiseg ...` line of the README's shell blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("wsiseg "):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def test_readme_shows_every_command():
    shown = {args[0] for args in readme_commands() if args}
    assert set(COMMANDS) - shown == set()


@pytest.mark.parametrize("args", readme_commands(), ids=lambda args: " ".join(args)[:60])
def test_readme_command_uses_known_options(args):
    command = cli.get_command(click.Context(cli), args[0])
    assert command is not None, f"unknown command {args[0]}"
    if isinstance(command, click.Group) and len(args) > 1:
        command = command.get_command(click.Context(command), args[1])
        assert command is not None, f"unknown command {args[0]} {args[1]}"
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help", "-h"}
    used = {token.split("=")[0] for token in args[1:] if token.startswith("-")}
    assert used <= known, f"wsiseg {args[0]}: unknown options {sorted(used - known)}"
