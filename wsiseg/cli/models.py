"""`wsiseg models` (the backbone registry) and `wsiseg merge` (export a plain merged model)."""

from __future__ import annotations

import json
from pathlib import Path

import click


def registry_rows() -> list[dict]:
    """One dict per registry entry, from the registry's declared facts (no backbone is built)."""
    from wsiseg.models.registry import list_specs

    return [spec.as_dict() for spec in list_specs()]


def norm_label(row: dict) -> str:
    """A short name for a normalisation (exact values are in --json)."""
    from wsiseg.models.registry import CLIP, HALF, IMAGENET

    named = {IMAGENET: "imagenet", CLIP: "clip", HALF: "0.5/0.5"}
    key = (tuple(row["mean"]), tuple(row["std"]))
    return named.get(key, "/".join(f"{m:.3f}" for m in row["mean"]))


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def models_command(as_json: bool) -> None:
    """List every registered backbone with embed dim, patch, prefix tokens, normalisation and trunk size."""
    rows = registry_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = f"{'name':<28} {'dim':>5} {'patch':>5} {'prefix':>6} {'multiple':>8} {'params':>10}  mean/std"
    click.echo(header)
    for row in rows:
        click.echo(f"{row['name']:<28} {row['embed_dim']:>5} {row['patch_size']:>5} {row['num_prefix_tokens']:>6} "
                   f"{row['input_multiple']:>8} {row['params'] / 1e6:>9.2f}M  {norm_label(row)}")
    click.echo("Any timm model also works as timm:<name> (e.g. timm:vit_tiny_patch16_224); details: --json")


@click.command("merge")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Merged checkpoint to write.")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="YAML whose model.pfm_weights_path points at your local PFM weights (default: the stored config).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def merge_command(checkpoint: Path, out: Path, config: Path | None, overwrite: bool) -> None:
    """Fold a LoRA/DoRA checkpoint into a plain model file that needs no PFM weights to load."""
    from wsiseg.models.checkpoint import merge_checkpoint

    written = merge_checkpoint(checkpoint, out, config, overwrite=overwrite)
    click.echo(f"wrote {written}")
