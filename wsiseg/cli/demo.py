"""`wsiseg demo` and `wsiseg doctor`."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_output"), show_default=True,
              help="Folder for every output of the demo.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Redo every stage instead of reusing finished ones.")
def demo_command(out: Path, device: str, overwrite: bool) -> None:
    """Run every stage of wsiseg on the built-in real samples (train, segment, F-Seg, export, evaluate)."""
    from wsiseg.demo import run_demo
    from wsiseg.progress import setup_console_logging

    setup_console_logging()
    report = run_demo(out, device=device, overwrite=overwrite)
    click.echo(report.as_text())


@click.command("doctor")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="Also check this config: its weights exist and fit their architecture.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("."), help="Where outputs will go (disk check).")
def doctor_command(config: Path | None, out: Path) -> None:
    """Check torch/CUDA, OpenSlide, codecs, the sample cache, disk and a config's weights before a long run."""
    from wsiseg.doctor import run_checks

    checks = run_checks(config, out)
    width = max(len(check.name) for check in checks)
    for check in checks:
        mark = "ok  " if check.ok else "FAIL"
        fix = f"  -> {check.fix}" if check.fix and not check.ok else ""
        click.echo(f"{mark} {check.name:<{width}}  {check.detail}{fix}")
    failed = [check for check in checks if not check.ok]
    if failed:
        click.echo(f"{len(failed)} check(s) failed", err=True)
        sys.exit(1)
    click.echo("all checks passed")
