"""`exmyconv inspect` and `exmyconv verify`."""
from __future__ import annotations

import sys

import click

from .output import emit, json_option, note


def verify_data(out_dir, report) -> dict:
    """What ``verify --json`` prints for a VerifyReport."""
    return {"out_dir": str(out_dir), "ok": report.ok, "tensors": report.tensors, "gpu": report.gpu,
            "gpu_exact": report.gpu_exact, "gpu_unsupported": report.gpu_unsupported,
            "errors_vs_source": report.errors, "problems": report.problems}


def run_verify(out_dir, source, use_gpu, as_json=False):
    """Verify OUT_DIR and print the report; exit 2 when it found problems."""
    from ..check.verify import render, verify

    report = verify(out_dir, source, use_gpu)
    emit(verify_data(out_dir, report), as_json, lambda _: render(report))
    if not report.ok:
        sys.exit(2)


@click.command("verify")
@click.argument("out_dir")
@click.option("--source", metavar="MODEL_DIR", help="The source checkpoint: also recompute the error against it.")
@click.option("--gpu/--no-gpu", "use_gpu", default=None, help="Require / skip the GPU check (default: when present).")
@json_option
def verify_cmd(out_dir, source, use_gpu, as_json):
    """Re-read OUT_DIR, decode every tensor, and check it bit-exactly on the GPU when there is one."""
    run_verify(out_dir, source, use_gpu, as_json)


@click.command()
@click.argument("path")
@json_option
@click.option("--plot", metavar="PNG", help="Draw the format search's error-vs-bits curve (needs matplotlib).")
def inspect(path, as_json, plot):
    """Describe a checkpoint: converted dir, single .safetensors file, or plain HF checkpoint."""
    from ..check.inspection import inspect_checkpoint, plot_tradeoff, render

    report = inspect_checkpoint(path)
    emit(report, as_json, render)
    if plot:
        plot_tradeoff(report, plot)
        note(f"wrote {plot}", as_json)
    if not report["intact"]:
        sys.exit(2)
