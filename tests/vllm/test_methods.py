"""The plugin's layer methods on their own (no engine): what the engine tests cannot reach on one CPU.

Tensor parallelism needs several ranks; here one layer is built as rank r of t would build it, fed the
full checkpoint tensors through the method's loaders (vLLM's own loader behind them is a plain copy,
as RowParallelLinear's is without ``input_dim``), and must compute with columns r*K/t .. (r+1)*K/t of
the weight, bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest

import vllm_env  # noqa: E402,F401  (vLLM's settings, before vLLM is imported)

pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed (scripts/ci-vllm runs these tests)")

import torch  # noqa: E402
from vllm.model_executor.layers.linear import RowParallelLinear  # noqa: E402

from exmyconv.format.exmy import get_format  # noqa: E402
from exmyconv.format.layout import TensorRecord  # noqa: E402
from exmyconv.format.quant import quantize  # noqa: E402
from exmyconv.integrations import vllm_layers  # noqa: E402
from exmyconv.integrations.vllm_layers import ExmyLinearMethod  # noqa: E402
from exmyconv.torch.codec import dequantize  # noqa: E402


def _weight(rng, fmt, n, k, group):
    q = quantize((rng.standard_normal((n, k)) * 0.02).astype(np.float32), get_format(fmt), group)
    scale = torch.from_numpy(q.scales).to(torch.float16 if q.scale_dtype == "F16" else torch.bfloat16)
    return TensorRecord("m.o_proj.weight", get_format(fmt), (n, k), "BF16", q.group_size), \
        torch.from_numpy(q.payload), scale, q.scale_dtype


def _copy_loader(param, loaded_weight, *shard):
    assert param.shape == loaded_weight.shape, (param.shape, loaded_weight.shape)
    param.data.copy_(loaded_weight)


@pytest.mark.parametrize("fmt,k,group,tp", [("e2m2", 512, None, 2), ("e2m2s4", 1024, 64, 4), ("e3m2", 768, 128, 3)])
def test_row_parallel_rank_computes_with_its_k_range(rng, fmt, k, group, tp):
    n = 48
    record, packed, scale, scale_dtype = _weight(rng, fmt, n, k, group)
    full = dequantize(packed, scale, fmt, k, group, torch.bfloat16)
    part = k // tp
    for rank in range(tp):
        layer = torch.nn.Module()
        layer.tp_rank, layer.tp_size, layer.params_dtype = rank, tp, torch.bfloat16
        method = ExmyLinearMethod("m.o_proj", {None: (record, scale_dtype)})
        method.create_weights(layer, part, [n], k, n, torch.bfloat16, weight_loader=_copy_loader)
        layer.weight_packed.weight_loader(layer.weight_packed, packed)
        layer.weight_scale.weight_loader(layer.weight_scale, scale)
        x = torch.randn(5, part).bfloat16()
        want = torch.nn.functional.linear(x, full[:, rank * part:(rank + 1) * part])
        assert torch.equal(method.apply(layer, x), want), rank


def test_row_parallel_split_that_cuts_groups_is_decoded_at_load(rng):
    record, *_ = _weight(rng, "e2m2", 16, 640, 128)
    layer = RowParallelLinear.__new__(RowParallelLinear)
    torch.nn.Module.__init__(layer)
    layer.tp_rank, layer.tp_size, layer.input_size_per_partition = 1, 2, 320
    reason = vllm_layers._cannot_pack(layer, {None: (record, "F16")})
    assert reason and "tensor parallelism 2 splits K=640" in reason and "groups of 128" in reason


def test_fused_shards_in_different_formats_are_named(rng):
    a, *_ = _weight(rng, "e2m2", 16, 256, None)
    b, *_ = _weight(rng, "e2m3", 16, 256, None)
    reason = vllm_layers._cannot_pack(torch.nn.Module(), {"q": (a, "F16"), "k": (b, "F16"), "v": (a, "F16")})
    assert "different formats (e2m2, e2m3, e2m2)" in reason and "tied" in reason


def test_mixed_scale_dtypes_are_held_as_float32(rng):
    """q stored fp16 scales and k bf16: one float32 parameter holds both exactly."""
    (rq, pq, sq, _), (rk, pk, sk, _) = _weight(rng, "e2m2", 32, 256, None), _weight(rng, "e2m2", 16, 256, None)
    sk = sk.to(torch.bfloat16)
    method = ExmyLinearMethod("m.qkv_proj", {"q": (rq, "F16"), "k": (rk, "BF16")})
    assert method.scale_dtype == torch.float32
    layer = torch.nn.Module()
    layer.tp_rank, layer.tp_size, layer.params_dtype = 0, 1, torch.bfloat16
    rows = {"q": (0, 32), "k": (32, 16)}

    def fused_loader(param, loaded_weight, shard):  # what QKVParallelLinear's loader does with output_dim 0
        start, size = rows[shard]
        param.data.narrow(0, start, size).copy_(loaded_weight)

    method.create_weights(layer, 256, [32, 16], 256, 48, torch.bfloat16, weight_loader=fused_loader)
    for shard, p, s in (("q", pq, sq), ("k", pk, sk)):
        layer.weight_packed.weight_loader(layer.weight_packed, p, shard)
        layer.weight_scale.weight_loader(layer.weight_scale, s, shard)
    w = torch.cat([dequantize(pq, sq, "e2m2", 256, None, torch.bfloat16),
                   dequantize(pk, sk, "e2m2", 256, None, torch.bfloat16)])
    x = torch.randn(3, 256).bfloat16()
    assert torch.equal(method.apply(layer, x), torch.nn.functional.linear(x, w))


def test_8_bit_scales_load_as_values_and_narrow_to_16_bits(rng):
    """q and k with 8-bit scales of different powers of two (and k far smaller): the scales load as their
    float32 values, become one exact 16-bit tensor after loading, and the layer computes with the
    dequantized weight (against the torch codec on each shard's own stored scales)."""
    from exmyconv.torch.codec import scale_values

    shards, rows = {}, {"q": (0, 32), "k": (32, 16)}
    tensors = {}
    for shard, (start, n), size in (("q", rows["q"], 0.02), ("k", rows["k"], 2e-5)):
        q = quantize((rng.standard_normal((n, 256)) * size).astype(np.float32), get_format("e2m1"), 32, scales8=True)
        record = TensorRecord(f"m.{shard}_proj.weight", get_format("e2m1"), (n, 256), "BF16", 32, scale_exp=q.scale_exp)
        stored = torch.from_numpy(q.scales * np.float32(2.0 ** -q.scale_exp)).to(torch.float8_e4m3fn)
        shards[shard] = (record, "F8_E4M3")
        tensors[shard] = (torch.from_numpy(q.payload), stored, q.scale_exp)
    assert tensors["q"][2] != tensors["k"][2]
    assert vllm_layers._cannot_pack(torch.nn.Module(), shards) is None
    method = ExmyLinearMethod("m.qkv_proj", shards)
    layer = torch.nn.Module()
    layer.tp_rank, layer.tp_size, layer.params_dtype = 0, 1, torch.bfloat16

    def fused_loader(param, loaded_weight, shard):
        start, size = rows[shard]
        param.data.narrow(0, start, size).copy_(loaded_weight)

    method.create_weights(layer, 256, [32, 16], 256, 48, torch.bfloat16, weight_loader=fused_loader)
    assert layer.weight_scale.dtype == torch.float32
    for shard, (packed, stored, _) in tensors.items():
        layer.weight_packed.weight_loader(layer.weight_packed, packed, shard)
        layer.weight_scale.weight_loader(layer.weight_scale, stored, shard)
    method.process_weights_after_loading(layer)
    assert layer.weight_scale.dtype in (torch.float16, torch.bfloat16)
    want_scales = torch.cat([scale_values(s, t) for _, s, t in tensors.values()])
    assert torch.equal(layer.weight_scale.float(), want_scales)
    w = torch.cat([dequantize(p, scale_values(s, t), "e2m1", 256, 32, torch.bfloat16) for p, s, t in tensors.values()])
    x = torch.randn(3, 256).bfloat16()
    y = method.apply(layer, x)
    assert not torch.isnan(y).any() and torch.equal(y, torch.nn.functional.linear(x, w))


def _moe_layer(experts, e, h, i, tp, rank):
    """A stand-in for vLLM's RoutedExperts as the packed MoE method uses it (rank ``rank`` of ``tp``)."""
    from types import SimpleNamespace

    layer = torch.nn.Module()
    layer.moe_config = SimpleNamespace(activation=SimpleNamespace(value="silu"), is_act_and_mul=True, tp_rank=rank,
                                       intermediate_size_per_partition=i // tp,
                                       moe_parallel_config=SimpleNamespace(tp_size=tp))
    layer.apply_router_weight_on_input, layer.use_ep, layer.global_num_experts = False, False, e
    layer._map_global_expert_id_to_local_expert_id = lambda expert: expert
    return layer


@pytest.mark.parametrize("fmt,group,scales8,tp", [("e2m2", None, False, 1), ("e2m2s4", 64, False, 2),
                                                   ("e2m1", 32, True, 2)])
def test_packed_moe_rank_computes_its_share_of_the_experts(rng, fmt, group, scales8, tp):
    """Per-expert w1/w3/w2 records (8-bit scales: each with its own scale_exp) loaded through the method's
    loaders, rank by rank: each rank's output is the experts computed with its rows of gate/up and its K
    range of down (float64 reference from the decoded weights), and the ranks' outputs sum to the whole."""
    e, h, i, top_k = 4, 128, 128, 2
    records, tensors, dense = {}, {}, {}
    for expert in range(e):
        for shard, (n, k) in (("w1", (i, h)), ("w3", (i, h)), ("w2", (h, i))):
            q = quantize((rng.standard_normal((n, k)) * 0.05 * (1 + expert)).astype(np.float32), get_format(fmt),
                         group, scales8=scales8)
            dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn}[q.scale_dtype]
            stored = torch.from_numpy(q.scales * np.float32(2.0 ** -q.scale_exp)).to(dtype)
            records[(expert, shard)] = (TensorRecord(f"m.experts.{expert}.{shard}.weight", get_format(fmt), (n, k),
                                                     "BF16", q.group_size, scale_exp=q.scale_exp if scales8 else None),
                                        q.scale_dtype)
            tensors[(expert, shard)] = (torch.from_numpy(q.payload), stored)
            dense[(expert, shard)] = torch.from_numpy(q.dequantize()).double()
    x = torch.randn(5, h)
    weights, ids = torch.softmax(torch.randn(5, e), -1).topk(top_k, dim=-1)
    total = torch.zeros(5, h, dtype=torch.float64)
    part = i // tp
    for rank in range(tp):
        layer = _moe_layer(records, e, h, i, tp, rank)
        stacks = vllm_layers._expert_stacks(layer, records)
        assert isinstance(stacks, dict), stacks
        method = vllm_layers.ExmyPackedMoEMethod(layer.moe_config, "m.experts", records, stacks)
        method.create_weights(layer, e, h, part, torch.float32)
        for (expert, shard), (packed, scale) in tensors.items():
            for param, value in ((layer.w2_weight_packed if shard == "w2" else layer.w13_weight_packed, packed),
                                 (layer.w2_weight_scale if shard == "w2" else layer.w13_weight_scale, scale)):
                assert param.weight_loader(param, value, "w", shard_id=shard, expert_id=expert) is True
        method.process_weights_after_loading(layer)
        assert layer.w13_weight_scale.dtype in (torch.float16, torch.bfloat16)
        y = method.apply(layer, x, weights, ids.to(torch.int32))
        want = torch.zeros(5, h, dtype=torch.float64)
        cols = slice(rank * part, (rank + 1) * part)
        for t in range(5):
            for j in range(top_k):
                ex = int(ids[t, j])
                gate = dense[(ex, "w1")][cols] @ x[t].double()
                up = dense[(ex, "w3")][cols] @ x[t].double()
                want[t] += weights[t, j].double() * (dense[(ex, "w2")][:, cols] @ (torch.nn.functional.silu(gate) * up))
        assert not torch.isnan(y).any() and y.dtype == torch.float32
        assert ((y.double() - want).norm() / want.norm()).item() < 1e-5
        total += y.double()
    full = torch.zeros(5, h, dtype=torch.float64)
    for t in range(5):
        for j in range(top_k):
            ex = int(ids[t, j])
            gate, up = dense[(ex, "w1")] @ x[t].double(), dense[(ex, "w3")] @ x[t].double()
            full[t] += weights[t, j].double() * (dense[(ex, "w2")] @ (torch.nn.functional.silu(gate) * up))
    assert ((total - full).norm() / full.norm()).item() < 1e-5
    if scales8:
        assert len({records[(ex, "w2")][0].scale_exp for ex in range(e)}) > 1  # (the experts' powers differed)


def test_packed_moe_falls_back_with_a_reason(rng):
    records = {}
    for expert in range(2):
        for shard, (n, k) in (("w1", (64, 64)), ("w3", (64, 64)), ("w2", (64, 64))):
            fmt = "e2m3" if (expert, shard) == (1, "w3") else "e2m2"
            records[(expert, shard)] = (TensorRecord(f"m.{expert}.{shard}", get_format(fmt), (n, k), "BF16", 64), "F16")
    layer = _moe_layer(records, 2, 64, 64, 1, 0)
    assert "different formats" in vllm_layers._expert_stacks(layer, records)
    del records[(1, "w3")]
    assert "not quantized" in vllm_layers._expert_stacks(layer, records)
    layer.moe_config.activation.value = "gelu"
    assert "activation gelu" in vllm_layers._expert_stacks(layer, records)
