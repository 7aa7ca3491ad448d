"""Units of work: which tensors stay together, and how they are packed into output shards by bytes.

Fused partners stay in one shard: q/k/v of an attention block, gate/up of an MLP, and every expert
of one MoE layer (engines load each of these into one fused weight, and a worker converting them
reads them together). A *block* is the run of tensors, in source order, from a group's first member
to its last (whatever lies between comes along, so the output keeps the source order); a tensor in
no group is a block of its own. Blocks are packed greedily, in order, into shards of at most
``max_bytes`` output bytes; a block larger than that gets a shard of its own.

The plan depends on nothing but names and sizes, so the single-process conversion and the Ray one
(``ray_runner``) cut the same shards, and a resumed run finds the shards it finished.

Imports: nothing of the package (names and sizes in, index lists out).
"""
from __future__ import annotations

import re

# The one weight an engine loads fused partners into. Expert stacks: transformers' ExmyExperts and
# engines' fused-MoE layers hold one projection of every expert of a MoE layer as one tensor (gate and
# up rows together; down), so its members need one format, group size and scale dtype (8-bit scales:
# one scale_exp). Dense fused weights (vLLM's qkv_proj, gate_up_proj) need one format.
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
MOE_LAYER = re.compile(r"^(.*\.experts)\.\d+\..*\.weight$")  # one MoE layer's experts (Mixtral, Qwen-MoE, DeepSeek, Kimi)


def _first_match(patterns, name: str, tag: str) -> str | None:
    for n, pattern in enumerate(patterns):
        match = pattern.match(name)
        if match:
            return f"{tag}{n}:{match[1]}"
    return None


def expert_stack(name: str) -> str | None:
    """The expert stack (a MoE layer's gate/up or down projection of every expert) ``name`` belongs to."""
    return _first_match(EXPERT_STACKS, name, "experts")


def fused_weight(name: str) -> str | None:
    """The fused weight ``name`` loads into in an engine (an expert stack, q/k/v, gate/up), or None."""
    return expert_stack(name) or _first_match(DENSE_FUSED, name, "dense")


def fused_group(name: str) -> str | None:
    """What ``name`` stays in one shard with: its MoE layer's experts (down included), or its fused weight."""
    return _first_match((MOE_LAYER,), name, "moe") or _first_match(DENSE_FUSED, name, "dense")


def blocks(names: list[str]) -> list[range]:
    """Consecutive index ranges covering ``names`` that no shard boundary may cut."""
    last = {}
    for i, name in enumerate(names):
        group = fused_group(name)
        if group is not None:
            last[group] = i
    out, start, reach = [], 0, -1
    for i, name in enumerate(names):
        group = fused_group(name)
        reach = max(reach, i if group is None else last[group])
        if i == reach:
            out.append(range(start, i + 1))
            start = i + 1
    return out


def pack(names: list[str], sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Indices of ``names`` per shard: blocks in order, a new shard when the next block would
    take the current one over ``max_bytes``. Always at least one (possibly empty) shard."""
    return pack_blocks(blocks(names), sizes, max_bytes)


def pack_blocks(blocks: list[range], sizes: list[int], max_bytes: int) -> list[list[int]]:
    """``pack`` for given blocks (one per index: units of work that may split fused partners)."""
    shards: list[list[int]] = [[]]
    size = 0
    for block in blocks:
        nbytes = sum(sizes[i] for i in block)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(block)
        size += nbytes
    return shards
