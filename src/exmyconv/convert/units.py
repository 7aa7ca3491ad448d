"""Units of work: which tensors stay together, and how they are packed into output shards by bytes.

Fused partners stay in one shard: q/k/v of an attention block, gate/up of an MLP, and every expert
of one MoE layer (engines load each of these into one fused weight, and a worker converting them
reads them together). A *block* is the run of tensors, in source order, from a group's first member
to its last (whatever lies between comes along, so the output keeps the source order); a tensor in
no group is a block of its own. Blocks are packed greedily, in order, into shards of at most
``max_bytes`` output bytes; a block larger than that gets a shard of its own.

The plan depends on nothing but names and sizes, so the single-process conversion and the Ray one
(``ray_runner``) cut the same shards, and a resumed run finds the shards it finished.

Imports: format.fused (what engines fuse; names and sizes in, index lists out).
"""
from __future__ import annotations

import re

from ..format.fused import DENSE_FUSED, match_key

MOE_LAYER = re.compile(r"^(.*\.experts)\.\d+\..*\.weight$")  # one MoE layer's experts (Mixtral, Qwen-MoE, DeepSeek, Kimi)


def fused_group(name: str) -> str | None:
    """What ``name`` stays in one shard with: its MoE layer's experts (down included), or its fused weight."""
    return match_key((MOE_LAYER,), name, "moe") or match_key(DENSE_FUSED, name, "dense")


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
