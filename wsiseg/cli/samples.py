"""`wsiseg samples`: fetch the real sample material."""

from __future__ import annotations

import json

import click


@click.command("samples")
@click.option("--json", "as_json", is_flag=True, help="Print the paths as JSON.")
def samples_command(as_json: bool) -> None:
    """Fetch the real sample slides, images and weights into the cache ($WSISEG_CACHE)."""
    from wsiseg.progress import setup_console_logging
    from wsiseg.samples import fetch_samples

    setup_console_logging()
    paths = fetch_samples()
    if as_json:
        click.echo(json.dumps({key: str(path) for key, path in paths.items()}, indent=2))
        return
    width = max(map(len, paths))
    for key, path in paths.items():
        click.echo(f"{key:<{width}}  {path}")
