"""Shard planning (convert/units.py): fused partners stay in one shard, source order is kept, sizes bound shards."""
from __future__ import annotations

from exmyconv.convert import units
from exmyconv.format import fused

LAYER = ["model.layers.0.input_layernorm.weight", "model.layers.0.mlp.down_proj.weight",
         "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
         "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.k_proj.weight",
         "model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.q_proj.weight",
         "model.layers.0.self_attn.v_proj.weight"]
MOE = ["model.layers.1.block_sparse_moe.experts.0.w1.weight", "model.layers.1.block_sparse_moe.experts.0.w2.weight",
       "model.layers.1.block_sparse_moe.experts.1.w1.weight", "model.layers.1.block_sparse_moe.experts.1.w2.weight",
       "model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.mlp.shared_experts.up_proj.weight"]


def test_blocks_keep_fused_partners_and_order():
    assert [list(b) for b in units.blocks(LAYER)] == [[0], [1], [2, 3], [4], [5, 6, 7, 8]]
    assert [list(b) for b in units.blocks(MOE)] == [[0, 1, 2, 3], [4], [5]]
    # biases are not grouped; names of no group are blocks of their own
    assert [list(b) for b in units.blocks(["a.q_proj.weight", "a.q_proj.bias", "x", "a.k_proj.bias"])] == \
        [[0], [1], [2], [3]]
    # groups that interleave merge into one block
    names = ["l.q_proj.weight", "l.gate_proj.weight", "l.k_proj.weight", "l.up_proj.weight", "z.weight"]
    assert [list(b) for b in units.blocks(names)] == [[0, 1, 2, 3], [4]]


def test_pack_by_bytes():
    names = LAYER + MOE
    shards = units.pack(names, [10] * len(names), 25)
    assert [i for s in shards for i in s] == list(range(len(names)))  # every tensor once, in order
    for shard in shards:  # never over the limit, unless one block is larger alone
        assert len(shard) * 10 <= 25 or any(list(b) == shard for b in units.blocks(names))
    assert [5, 6, 7, 8] in shards and [9, 10, 11, 12] in shards
    assert units.pack([], [], 10) == [[]]
    assert units.pack(["a", "b"], [100, 1], 10) == [[0], [1]]


def test_fused_weights_and_expert_stacks():
    """What engines fuse into one weight: one MoE layer's gate/up (w1/w3) of every expert, its down (w2), and the
    dense q/k/v and gate/up of one parent module; shared experts and routers are not expert stacks."""
    key = fused.fused_weight
    assert key(MOE[0]) == key(MOE[2]) != key(MOE[1]) == key(MOE[3])
    assert key("model.layers.1.block_sparse_moe.experts.0.w3.weight") == key(MOE[0])
    qwen = "model.layers.2.mlp.experts.{}.{}.weight"
    assert key(qwen.format(0, "gate_proj")) == key(qwen.format(7, "up_proj")) != key(qwen.format(7, "down_proj"))
    assert key(qwen.format(0, "gate_proj")) != key("model.layers.3.mlp.experts.0.gate_proj.weight")
    assert fused.expert_stack(qwen.format(3, "down_proj")) and fused.expert_stack(MOE[5]) is None
    assert fused.expert_stack(MOE[4]) is None and key(MOE[4]) is None  # the router
    assert key(LAYER[5]) == key(LAYER[7]) == key(LAYER[8]) != key(LAYER[2]) == key(LAYER[3])
    assert fused.expert_stack(LAYER[5]) is None and key(LAYER[1]) is None and key(LAYER[6]) is None
    assert key("model.layers.0.self_attn.q_proj.bias") is None
    # a shard keeps a whole MoE layer (down included): its stacks' scale choice is made within one shard
    assert units.fused_group(MOE[0]) == units.fused_group(MOE[1])
