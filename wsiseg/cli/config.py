"""`wsiseg config migrate`: the native equivalent of a reference-dialect config."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("config")
def config_command() -> None:
    """Work with YAML configs (native, or the reference project's dialect)."""


@config_command.command("migrate")
@click.argument("old", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the native YAML here (default: print it).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def migrate_command(old: Path, out: Path | None, overwrite: bool) -> None:
    """Write the native equivalent of a reference config OLD (checked first; comments list what changed)."""
    from wsiseg.config import migrate_config

    text = migrate_config(old, out, overwrite=overwrite)
    if out is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"wrote {out}", err=True)
