"""`exmyconv eval`: the quality cost of a conversion (registered by cli/main.py)."""
from __future__ import annotations

import json

import click

from ..errors import ExmyError

TOKENS, SEQ_LEN = 4096, 512  # = bench.quality's defaults; repeated so that --help imports no torch


@click.command("eval")
@click.argument("converted")
@click.option("--source", default=None, metavar="MODEL_DIR",
              help="The model it was converted from (folder, @minilm or a Hub id): KL divergence, top-1 "
                   "agreement and its perplexity (causal LMs), embedding cosine (encoders: required).")
@click.option("--text", "text_file", default=None, metavar="FILE",
              help="UTF-8 text to evaluate on [default: an English text that ships with exmyconv].")
@click.option("--tokens", type=int, default=TOKENS, show_default=True,
              help="Tokens to score (encoders: sentences up to this many tokens).")
@click.option("--seq-len", type=int, default=SEQ_LEN, show_default=True,
              help="Window length (capped by the model's positions); encoders: longest sentence.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="[default: cuda when PyTorch sees a GPU, else cpu]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--plot", "plot_path", default=None, metavar="PNG",
              help="Write a histogram of the per-token KL divergence (encoders: of 1 - cosine); needs matplotlib.")
def eval_cmd(converted, source, text_file, tokens, seq_len, device, as_json, plot_path):
    """Run CONVERTED (an exmy folder, loaded as transformers loads it) and, with --source, the original on
    the same text: perplexity, KL divergence, top-1 agreement; for encoders, embedding cosine similarity."""
    from ..bench import quality

    if plot_path:
        if source is None:
            raise ExmyError("--plot needs --source (it draws the per-token difference to the source)")
        quality.pyplot()
    result = quality.evaluate(converted, source, text_file, tokens, seq_len, device)
    click.echo(json.dumps(result.summary, indent=1) if as_json else quality.report(result.summary))
    if plot_path:
        quality.plot(result, plot_path)
        click.echo(f"wrote {plot_path}", err=as_json)
