"""Which tensors of a checkpoint engines fuse into one weight, by their names (Hugging Face conventions).

- *Expert stacks*: transformers' ExmyExperts and engines' fused-MoE layers hold one projection of every
  expert of a MoE layer as one tensor: the gate and up rows of every expert (``experts.N.gate_proj`` /
  ``up_proj``, Mixtral's ``w1`` / ``w3``), and the down rows (``down_proj``, ``w2``). Its members need
  one format, group size and scale dtype (8-bit scales: one scale_exp) to load as one tensor.
- *Dense fused weights* (vLLM's ``qkv_proj``, ``gate_up_proj``): siblings under one parent module that
  an engine runs as one layer, in one format.

``exmyconv quantize`` ties both (``--format auto`` formats; stacks' scale choices), ``inspect`` reports
stacks that do not agree. Imports: nothing of the package.
"""
from __future__ import annotations

import re

EXPERT_STACKS = (
    re.compile(r"^(.*\.experts)\.\d+\.(?:gate_proj|up_proj|w1|w3)\.weight$"),  # Qwen-MoE, DeepSeek; Mixtral
    re.compile(r"^(.*\.experts)\.\d+\.(?:down_proj|w2)\.weight$"),
)
DENSE_FUSED = (
    re.compile(r"^(.*\.)[qkv]_proj\.weight$"),  # attention q/k/v
    re.compile(r"^(.*\.)(?:gate|up)_proj\.weight$"),  # MLP gate/up
    re.compile(r"^(.*\.)w[13]\.weight$"),  # Mixtral-style w1/w3
    re.compile(r"^(.*\.)(?:query|key|value)\.weight$"),  # BERT-style attention
)


def match_key(patterns, name: str, tag: str) -> str | None:
    """``tag`` + the number of the first pattern that matches ``name`` + its first group, or None."""
    for n, pattern in enumerate(patterns):
        match = pattern.match(name)
        if match:
            return f"{tag}{n}:{match[1]}"
    return None


def expert_stack(name: str) -> str | None:
    """The expert stack (a MoE layer's gate/up or down projection of every expert) ``name`` belongs to."""
    return match_key(EXPERT_STACKS, name, "experts")


def fused_weight(name: str) -> str | None:
    """The fused weight ``name`` loads into in an engine (an expert stack, q/k/v, gate/up), or None."""
    return expert_stack(name) or match_key(DENSE_FUSED, name, "dense")
