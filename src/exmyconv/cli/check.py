"""`exmyconv inspect` and `exmyconv verify`."""
from __future__ import annotations

import json
import sys

import click


def run_verify(out_dir, source, use_gpu):
    from ..check.verify import render, verify

    report = verify(out_dir, source, use_gpu)
    click.echo(render(report))
    if not report.ok:
        sys.exit(2)


@click.command("verify")
@click.argument("out_dir")
@click.option("--source", metavar="MODEL_DIR", help="The source checkpoint: also recompute the error against it.")
@click.option("--gpu/--no-gpu", "use_gpu", default=None, help="Require / skip the GPU check (default: when present).")
def verify_cmd(out_dir, source, use_gpu):
    """Re-read OUT_DIR, decode every tensor, and check it bit-exactly on the GPU when there is one."""
    run_verify(out_dir, source, use_gpu)


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--plot", metavar="PNG", help="Draw the format search's error-vs-bits curve (needs matplotlib).")
def inspect(path, as_json, plot):
    """Describe a checkpoint: converted dir, single .safetensors file, or plain HF checkpoint."""
    from ..check.inspection import inspect_checkpoint, plot_tradeoff, render

    report = inspect_checkpoint(path)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    if plot:
        plot_tradeoff(report, plot)
        click.echo(f"wrote {plot}")
    if not report["intact"]:
        sys.exit(2)
