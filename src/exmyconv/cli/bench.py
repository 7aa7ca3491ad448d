"""`exmyconv bench`: GPU benchmark command (registered by cli/main.py)."""
from __future__ import annotations

import sys

import click

from ..errors import ExmyError
from ..format.exmy import NAMED


@click.command("bench")
@click.option("--formats", default=None,
              help=f"Comma-separated ExMy formats to benchmark [default: {','.join(NAMED)}; "
                   f"with --e2e: fp16 plus e2m2,e2m1,e4m3]; with --quality: variants FORMAT[-gG], auto-BITS[+cal][-untied], "
                   f"intB[-gG], peers nf4-b64, hqq4-gG, gptq4-gG (docs/quality.md) [default: 10 formats, auto-4.25, "
                   f"auto-5, int4-g128, int4-g32, int5-g128 and the peers that run here].")
@click.option("--shapes", default=None, metavar="KxN,...",
              help="Layer shapes as K inputs x N outputs (default: 4096x4096, 4096x14336, 14336x4096, "
                   "8192x28672, 28672x8192).")
@click.option("--checkpoint", default=None, metavar="PATH",
              help="Benchmark the weight shapes of this checkpoint (exmy or plain safetensors) instead; "
                   "with --quality: the model to convert and measure [default: @minilm].")
@click.option("--max-shapes", type=int, default=8, show_default=True,
              help="With --checkpoint: the largest this many distinct shapes.")
@click.option("--batches", default=None, help="Batch sizes (1..16 per launch) [default: 1,2,4,8,16; with --e2e: 1,4].")
@click.option("--group-size", type=int, default=None,
              help="Scale group size of the random weights (default: one scale per output channel).")
@click.option("--reps", type=int, default=100, show_default=True, help="Timed launches per measurement.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16"]), default="float16", show_default=True,
              help="Activations' dtype of the GEMV benchmark (and of its torch baseline and peers).")
@click.option("--no-dequant", is_flag=True, help="Skip the dequantization bandwidth measurement.")
@click.option("--peers", is_flag=True, help="Also time vLLM's Humming kernels (pip install humming-kernels) for "
                                             "e2m1/e2m2/e3m2/e2m3 and its int4-g128, in the same run.")
@click.option("--json", "json_path", default=None,
              help="Write results here [default: exmy-bench.json; with --quality: exmy-quality.json].")
@click.option("--png", "png_path", default=None,
              help="Plot of speedup vs batch, one line per format [default: exmy-bench.png]; with --quality: "
                   "quality vs bits per weight, one point per variant [default: exmy-quality.png].")
@click.option("--e2e", "e2e", default=None, metavar="MODEL_OR_CONFIG",
              help="End-to-end greedy decoding tokens/s, fp16 vs ExMy, random weights: 'llama3-8b' or a "
                   "transformers config.json (or its folder). See docs/benchmarks.md.")
@click.option("--generate", is_flag=True,
              help="With --e2e: time transformers generate() itself (eager and compiled, bf16 against ExMy "
                   "conversions; default --formats e2m2, --batches 1,4,16, --tokens 64), GPU memory after load.")
@click.option("--layers", type=int, default=None, help="With --e2e: decoder layers (shrinks the model).")
@click.option("--tokens", type=int, default=None,
              help="With --e2e: tokens decoded per run [default: 128]; with --quality: tokens scored [default: 2048].")
@click.option("--quality", is_flag=True, help="On the CPU: model quality vs bits per weight of ExMy variants and "
                                               "integer RTN baselines, measured as `exmyconv eval` does.")
@click.option("--text", "text_file", default=None, metavar="FILE",
              help="With --quality: text to measure on [default: the one `exmyconv eval` uses].")
@click.option("--seq-len", type=int, default=512, show_default=True, help="With --quality: window length.")
@click.option("--calibration", default=None, metavar="TEXT_FILE",
              help="With --quality: calibration text for auto-B+cal and gptq4-gG variants (adds auto-5+cal and "
                   "gptq4-g128 to the default list).")
def bench(formats, shapes, checkpoint, max_shapes, batches, group_size, reps, dtype, no_dequant, peers, json_path, png_path,
          e2e, generate, layers, tokens, quality, text_file, seq_len, calibration):
    """Time GPU dequantization and the fused ExMy GEMV against torch fp16 F.linear (needs a CUDA GPU);
    --quality: model quality against bits per weight, on the CPU."""
    if quality:
        _bench_quality(checkpoint or "@minilm", formats, tokens, text_file, seq_len, calibration,
                       json_path or "exmy-quality.json", png_path or "exmy-quality.png")
        return
    json_path, png_path = json_path or "exmy-bench.json", png_path or "exmy-bench.png"
    if generate and e2e is None:
        click.echo("error: --generate goes with --e2e MODEL_OR_CONFIG", err=True)
        sys.exit(1)
    if generate:
        _bench_generate(e2e, formats, batches, layers, 64 if tokens is None else tokens, json_path)
        return
    if e2e is not None:
        _bench_e2e(e2e, formats, batches, layers, 128 if tokens is None else tokens, json_path)
        return
    formats = formats or ",".join(NAMED)
    batches = batches or "1,2,4,8,16"
    from ..cuda import device

    reason = device.bench_reason()
    if reason:
        click.echo(f"exmyconv bench: {reason}", err=True)
        sys.exit(2)
    from ..bench import kernels as b

    try:
        fmts = [f.strip() for f in formats.split(",") if f.strip()]
        from ..format.exmy import get_format

        for f in fmts:
            get_format(f)
        batch_list = [int(v) for v in batches.split(",") if v.strip()]
        if not batch_list or not all(1 <= v <= 16 for v in batch_list):
            raise ExmyError("batches must be between 1 and 16")
        if checkpoint:
            shape_list = b.checkpoint_shapes(checkpoint)[:max_shapes]
        elif shapes:
            shape_list = b.parse_shapes(shapes)
        else:
            shape_list = list(b.STANDARD_SHAPES)
    except (ExmyError, ValueError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    result = b.run(shape_list, fmts, batch_list, group_size, reps=reps, dequant=not no_dequant, peers=peers, dtype=dtype,
                   log=lambda msg: click.echo(msg, err=True))
    click.echo(b.table(result))
    for path in b.write(result, json_path, png_path):
        click.echo(f"wrote {path}")


def _parsed(parse):
    """parse(), or its error as one line and exit status 1."""
    try:
        return parse()
    except ExmyError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)


def _counts(tokens: int, layers: int | None) -> None:
    if tokens < 1:
        raise ExmyError(f"--tokens must be at least 1, got {tokens}")
    if layers is not None and layers < 1:
        raise ExmyError(f"--layers must be at least 1, got {layers}")


def _require_gpu(what: str) -> None:
    from ..cuda import device

    reason = device.bench_reason()
    if reason:
        click.echo(f"exmyconv bench {what}: {reason}", err=True)
        sys.exit(2)


def _bench_e2e(spec, formats, batches, layers, tokens, json_path):
    from ..bench import e2e as e

    cfg, fmts, batch_list = _parsed(lambda: (_counts(tokens, None), e.build_config(spec, layers),
                                             e.parse_formats(formats), e.parse_batches(batches))[1:])
    _require_gpu("--e2e")
    result = e.run(cfg, fmts, batch_list, tokens=tokens, log=lambda msg: click.echo(msg, err=True))
    click.echo(e.table(result))
    if json_path:
        import json

        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
        click.echo(f"wrote {json_path}")


def _bench_generate(spec, formats, batches, layers, tokens, json_path):
    from ..bench import e2e as e
    from ..bench import generate as g

    variants, batch_list = _parsed(lambda: (_counts(tokens, layers), g.parse_variants(formats),
                                            e.parse_batches(batches or ",".join(map(str, g.DEFAULT_BATCHES))))[1:])
    _require_gpu("--e2e --generate")
    result = _parsed(lambda: g.run(spec, variants, batch_list, layers=layers, tokens=tokens,
                                   log=lambda msg: click.echo(msg, err=True)))
    click.echo(g.table(result))
    g.write_json(result, json_path)
    click.echo(f"wrote {json_path}")


def _bench_quality(model, variants, tokens, text_file, seq_len, calibration, json_path, png_path):
    from ..bench import compare

    chosen = compare.parse_variants(variants, calibration)
    result = compare.run(model, chosen, text_file, compare.DEFAULT_TOKENS if tokens is None else tokens, seq_len,
                         calibration=calibration, log=lambda msg: click.echo(msg, err=True))
    click.echo(compare.table(result))
    for path in compare.write(result, json_path, png_path):
        click.echo(f"wrote {path}")
