"""`exmyconv quantize` and `exmyconv dequantize`."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from ..format.exmy import DEFAULT, NAMED, NAMED_SHARED
from ..format.layout import SEARCH_REPORT
from .check import run_verify
from ..integrations.hub import hub_source
from .hub import push_converted
from .options import parse_size


@click.command()
@click.argument("model_dir")
@click.argument("out_dir")
@click.option("--format", "format_", default=DEFAULT, show_default=True,
              help=f"ExMy format: {', '.join(NAMED)}, the mantissa-shared {', '.join(NAMED_SHARED)}, "
                   "any eXmY (1<=X<=5, 0<=Y<=5, 1+X+Y<=8) or eXmYsk (k weights share the last mantissa bit); "
                   "or 'auto' to choose per tensor (with --bits or --max-error).")
@click.option("--bits", type=float, help="auto: average bits per quantized weight, scales included.")
@click.option("--max-error", type=float, help="auto: per tensor, the smallest candidate with relative error <= this.")
@click.option("--candidates", metavar="LIST", help="auto: comma-separated FORMAT[-gGROUP][+clip] "
              "(default: e2m1-g32,e2m1-g64,e2m2s4-g128,e2m2s4,e2m2-g128,e2m2,e2m2-g64,e2m3s3,e3m2,e2m3,e2m3-g64,e4m3).")
@click.option("--tie-fused/--no-tie-fused", default=True, show_default=True,
              help="auto: one format for the tensors engines fuse into one layer (q/k/v, gate/up), as vLLM "
                   "needs to keep them packed.")
@click.option("--calibration", type=click.Path(), metavar="TEXT_FILE",
              help="Run the model on this text and weight errors by input-channel activation energy.")
@click.option("--calibration-tokens", type=int, default=4096, show_default=True, help="Tokens of TEXT_FILE to use.")
@click.option("--group-size", type=int, default=None,
              help="Elements per scale along the input dimension (e.g. 32, 64, 128). Default: one scale "
                   "per output channel. A row whose length it does not divide ends with a shorter group.")
@click.option("--skip", multiple=True, metavar="REGEX", help="Keep tensors whose name matches (repeatable).")
@click.option("--quantize-embeddings", is_flag=True, help="Also quantize embeddings and lm_head.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--clip-search", is_flag=True, help="Per group, pick the clipping ratio with least MSE (slower).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option("--verify/--no-verify", default=None,
              help="Re-read OUT_DIR and check it (bit-exact on the GPU). Default: on when a GPU is present.")
@click.option("--revision", metavar="REV",
              help="With a Hub repo id (owner/name) as MODEL_DIR: its branch, tag or commit.")
@click.option("--push-to-hub", metavar="REPO_ID", help="Then upload OUT_DIR to this Hub model repo, with a model card.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
def quantize(model_dir, out_dir, format_, bits, max_error, candidates, tie_fused, calibration, calibration_tokens,
             group_size, skip, quantize_embeddings, max_shard_size, clip_search, overwrite, verify,
             revision, push_to_hub, private):
    """Quantize MODEL_DIR (a Hugging Face safetensors checkpoint, a Hub repo id owner/name, or @minilm) into OUT_DIR."""
    from ..convert.pipeline import Options, convert

    opts = Options(format=format_, group_size=group_size, skip=tuple(skip),
                   quantize_embeddings=quantize_embeddings, max_shard_size=parse_size(max_shard_size),
                   clip_search=clip_search, bits=bits, max_error=max_error, candidates=candidates,
                   tie_fused=tie_fused, calibration=calibration, calibration_tokens=calibration_tokens)
    source_arg = model_dir
    model_dir, hub_id = hub_source(model_dir, revision, push_to_hub, private)
    s = convert(model_dir, out_dir, opts, overwrite=overwrite)
    if opts.auto:
        group = "per-tensor search"
    else:
        group = f"groups of {opts.group_size}" if opts.group_size else "one scale per channel"
    rate = s.quantized_weights / s.seconds / 1e6 if s.seconds else 0.0
    click.echo(f"quantized {s.quantized}/{s.tensors} tensors to {s.format} ({group}) "
               f"in {s.seconds:.2f} s ({rate:.1f} M weights/s)")
    click.echo(f"  bits/weight: {s.bits_per_weight:.3f} (scales included) over {s.quantized_weights / 1e6:.2f} M weights")
    click.echo(f"  size: {s.source_bytes / 1e6:.1f} MB -> {s.output_bytes / 1e6:.1f} MB")
    if s.errors:
        name, worst = s.worst
        click.echo(f"  relative error: mean {s.mean_error:.4f}, worst {worst:.4f} ({name})")
    if s.search:
        _echo_search(s)
    for head, emb in s.tied.items():
        click.echo(f"  {head} is tied to {emb} (identical): stored once, re-tied on load")
    if s.kept:
        click.echo(f"warning: {len(s.kept)} weights left unquantized:", err=True)
        width = max(map(len, s.kept))
        for name, why in s.kept.items():
            click.echo(f"  {name:<{width}}  {why}", err=True)
    click.echo(f"wrote {s.out_dir} ({s.shards} shard{'s' if s.shards > 1 else ''})")
    if verify is None:
        from ..check.verify import gpu_backend

        verify = gpu_backend()[0] is not None
    if verify:
        run_verify(out_dir, model_dir, None)
    if push_to_hub:
        push_converted(out_dir, push_to_hub, private, hub_id or source_arg)


def _echo_search(s):
    r = s.search
    target = f"budget {r['budget_bits']} bits" if r["budget_bits"] is not None else f"max error {r['max_error']}"
    click.echo(f"  search ({r['objective']}, {target}, {s.search_seconds:.1f} s on {r['measured_on']}): "
               f"{r['achieved_bits']:.3f} bits/weight, "
               f"mean rel. MSE {r['mean_rel_mse']:.3e}; chosen: "
               + ", ".join(f"{k} x{v}" for k, v in Counter(s.formats.values()).most_common()))
    curve = r["tradeoff"]
    shown = [curve[round(i * (len(curve) - 1) / 7)] for i in range(8)] if len(curve) > 8 else curve
    click.echo("  error vs bits, whole model (bits: mean rel. MSE): "
               + "  ".join(f"{p['bits']:.2f}: {p['mean_rel_mse']:.1e}" for p in shown))
    click.echo(f"  details: {Path(s.out_dir) / SEARCH_REPORT}")


@click.command()
@click.argument("out_dir")
@click.argument("fp_dir")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Output dtype of dequantized tensors (default: the config's torch_dtype, else float16).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty FP_DIR.")
def dequantize(out_dir, fp_dir, dtype, max_shard_size, overwrite):
    """Write OUT_DIR back as a plain safetensors checkpoint that loads without exmyconv."""
    from ..convert.dequantize import dequantize_checkpoint

    r = dequantize_checkpoint(out_dir, fp_dir, dtype, parse_size(max_shard_size), overwrite)
    click.echo(f"wrote {r['out_dir']}: {r['dequantized']} of {r['tensors']} tensors dequantized to {r['dtype']}, "
               f"{r['bytes'] / 1e6:.1f} MB in {r['shards']} shard{'s' if r['shards'] > 1 else ''}")
