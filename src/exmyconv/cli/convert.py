"""`exmyconv quantize` and `exmyconv dequantize`."""
from __future__ import annotations

import sys

import click

from ..convert.search import DEFAULT_CANDIDATES
from ..errors import ExmyError
from ..format.exmy import DEFAULT, NAMED, NAMED_SHARED
from .check import verify_data
from ..integrations.hub import hub_source
from .hub import command_line, push_converted
from .options import parse_size
from .output import emit, json_option, note, plural, to_json
from .report import group_text, kept_lines, plan_text, summary_data, summary_text


# options about where and how the work ran, not what it made: not recorded (the same weights, resumed
# or on Ray, checked or not, stay byte-identical)
HOW_IT_RAN = ("resume", "ray_address", "workers", "verify", "overwrite", "as_json")


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
              f"(default: {','.join(DEFAULT_CANDIDATES)}).")
@click.option("--tie-fused/--no-tie-fused", default=True, show_default=True,
              help="auto: one format for the tensors engines fuse into one weight (q/k/v, gate/up; a MoE layer's "
                   "gate/up of every expert, its down of every expert), as vLLM and transformers need to keep "
                   "them packed.")
@click.option("--calibration", type=click.Path(), metavar="TEXT_FILE",
              help="Run the model on this text and weight errors by input-channel activation energy.")
@click.option("--calibration-tokens", type=int, default=4096, show_default=True, help="Tokens of TEXT_FILE to use.")
@click.option("--rounding", type=click.Choice(["nearest", "gptq"]), default="nearest", show_default=True,
              help="gptq (needs --calibration): round the input columns in order, each one's error compensated "
                   "on the columns still to come through the activations' Hessian (GPTQ); same layout.")
@click.option("--scales", type=click.Choice(["16", "e4m3"]), default="16", show_default=True,
              help="Scale storage: 16 (fp16, or bf16 where fp16 would not do) or e4m3 (8 bits per group times "
                   "a power of two per tensor: small groups at half the scale cost; layout 2.0).")
@click.option("--group-size", type=int, default=None,
              help="Elements per scale along the input dimension (e.g. 32, 64, 128). Default: one scale "
                   "per output channel. A row whose length it does not divide ends with a shorter group.")
@click.option("--skip", multiple=True, metavar="REGEX", help="Keep tensors whose name matches (repeatable).")
@click.option("--quantize-embeddings", is_flag=True, help="Also quantize embeddings and lm_head.")
@click.option("--quantize-routers", is_flag=True, help="Also quantize MoE routers (kept in source precision by "
              "default: tiny, and the tensor whose error costs most).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--clip-search", is_flag=True, help="Per group, pick the clipping ratio with least MSE (slower).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run into OUT_DIR (a failed or killed run keeps "
              "its finished shards in its temporary folder); refused if the source or options changed.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run the work as Ray tasks: on a local cluster, or the cluster at ADDRESS (auto, HOST:PORT, "
                   "ray://HOST:PORT; write --ray=ADDRESS or put it after OUT_DIR). Same output as without.")
@click.option("--workers", type=int, help="With --ray: tasks at once (default: the cluster's CPUs).")
@click.option("--verify/--no-verify", default=None,
              help="Re-read OUT_DIR and check it (bit-exact on the GPU). Default: on when a GPU is present.")
@click.option("--revision", metavar="REV",
              help="With a Hub repo id (owner/name) as MODEL_DIR: its branch, tag or commit.")
@click.option("--push-to-hub", metavar="REPO_ID", help="Then upload OUT_DIR to this Hub model repo, with a model card.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option("--dry-run", is_flag=True, help="Show the plan (per tensor: format, group, bits, bytes; with auto: the "
              "search's choice and curve) and the totals; write nothing.")
@json_option
def quantize(model_dir, out_dir, format_, bits, max_error, candidates, tie_fused, calibration, calibration_tokens,
             rounding, scales, group_size, skip, quantize_embeddings, quantize_routers, max_shard_size, clip_search, overwrite, verify,
             revision, push_to_hub, private, dry_run, as_json, resume, ray_address, workers):
    """Quantize MODEL_DIR (a Hugging Face safetensors checkpoint, a Hub repo id owner/name, or @minilm) into OUT_DIR."""
    from ..convert.pipeline import Options, convert

    opts = Options(format=format_, group_size=group_size, skip=tuple(skip),
                   quantize_embeddings=quantize_embeddings, quantize_routers=quantize_routers,
                   max_shard_size=parse_size(max_shard_size),
                   clip_search=clip_search, bits=bits, max_error=max_error, candidates=candidates,
                   tie_fused=tie_fused, calibration=calibration, calibration_tokens=calibration_tokens,
                   rounding=rounding, scales=scales)
    if dry_run and push_to_hub:
        raise ExmyError("--dry-run writes and uploads nothing: leave out --push-to-hub (after the run, "
                        "`exmyconv push OUT_DIR REPO_ID --dry-run` shows what it would upload)")
    if dry_run and (resume or ray_address is not None):
        raise ExmyError("--dry-run only plans, in this process: leave out --resume and --ray")
    runner = None
    if ray_address is not None:
        from ..convert.ray_runner import RayRunner

        runner = RayRunner(ray_address or None, workers)
    elif workers is not None:
        raise ExmyError("--workers goes with --ray")
    source_arg = model_dir
    model_dir, hub_id = hub_source(model_dir, revision, push_to_hub, private)
    if dry_run:
        from ..convert.pipeline import dry_run as plan_run

        s = plan_run(model_dir, out_dir, opts, overwrite=overwrite)
        emit(summary_data(s), as_json, lambda _: plan_text(s, group_text(opts)))
        return
    s = convert(model_dir, out_dir, opts, overwrite=overwrite, command=command_line(leave_out=HOW_IT_RAN),
                resume=resume, runner=runner)
    result = summary_data(s)
    if not as_json:
        click.echo(summary_text(s, group_text(opts)))
    if s.kept:
        click.echo("\n".join(kept_lines(s)), err=True)
    note(f"wrote {s.out_dir} ({plural(s.shards, 'shard')})", as_json)
    if verify is None:
        from ..check.verify import gpu_backend

        verify = gpu_backend()[0] is not None
    if verify:
        from ..check.verify import render, verify as verify_checkpoint

        report = verify_checkpoint(out_dir, model_dir, None)
        result["verify"] = verify_data(out_dir, report)
        if not as_json:
            click.echo(render(report))
        if not report.ok:
            if as_json:
                click.echo(to_json(result))
            sys.exit(2)
    if push_to_hub:
        result["uploaded"] = push_converted(out_dir, push_to_hub, private, hub_id or source_arg, echo=not as_json)
    if as_json:
        click.echo(to_json(result))


@click.command()
@click.argument("out_dir")
@click.argument("fp_dir")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Output dtype of dequantized tensors (default: the config's torch_dtype, else float16).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty FP_DIR.")
@json_option
def dequantize(out_dir, fp_dir, dtype, max_shard_size, overwrite, as_json):
    """Write OUT_DIR back as a plain safetensors checkpoint that loads without exmyconv."""
    from ..convert.dequantize import dequantize_checkpoint

    r = dequantize_checkpoint(out_dir, fp_dir, dtype, parse_size(max_shard_size), overwrite)
    emit(r, as_json, f"wrote {r['out_dir']}: {r['dequantized']} of {r['tensors']} tensors dequantized to "
                     f"{r['dtype']}, {r['bytes'] / 1e6:.1f} MB in {plural(r['shards'], 'shard')}")
