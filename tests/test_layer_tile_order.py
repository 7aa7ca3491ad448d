"""Tile order in the torch layers (ExmyLinear, sibling groups), on the CPU with a stand-in GPU backend.

On the GPU the layers replace their packed buffer by its bytes in tile order (linear.tile_ordered), the
order the GEMV reads fastest (docs/kernels.md). What must hold: every way out of the layer gives the
file's row order (state_dict, dequantize_weight, the weight property, the op's decoding paths, a move),
every way in is laid out again (load_state_dict, assign, a move back), and the outputs never change.
The stand-in (tests/fake_gpu.py) decodes the bytes it is given in the order the layer declares, so a
layer that declares the wrong order computes wrong values. Reference: the same weights never reordered.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from exmyconv.cuda import gpu as real_gpu  # noqa: E402
from exmyconv.format.exmy import get_format  # noqa: E402
from exmyconv.format.quant import quantize  # noqa: E402
from exmyconv.torch.linear import ExmyLinear  # noqa: E402
from exmyconv.torch.siblings import SiblingGroup  # noqa: E402

from fake_gpu import FakeGpu  # noqa: E402

K = 256  # padded K a multiple of 128: tile order applies to whole 16-row tiles


@pytest.fixture(autouse=True)
def cpu_streams(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))


def layer(n: int, seed: int, fmt: str = "e2m2", bias: bool = True, k: int = K) -> ExmyLinear:
    rng = np.random.default_rng(seed)
    qt = quantize(rng.standard_normal((n, k)).astype(np.float32), get_format(fmt), 64)
    m = ExmyLinear(k, n, fmt, 64, bias=bias, scale_dtype=torch.float16)
    m.weight_packed.copy_(torch.from_numpy(qt.payload))
    m.weight_scale.copy_(torch.from_numpy(qt.scales))
    if bias:
        m.bias.data = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    return m


def reference(m: ExmyLinear, x: torch.Tensor) -> torch.Tensor:
    """What the CUDA path computes (bias added to the GEMV's output, as ExmyLinear._gpu_compute does)."""
    y = torch.nn.functional.linear(x, m.dequantize_weight(x.dtype))
    return y if m.bias is None else y + m.bias.to(x.dtype)


@pytest.mark.parametrize("fmt", ["e2m2", "e3m2", "e2m1", "e4m3"])
def test_a_layer_in_tile_order_computes_and_gives_row_order_back(fmt):
    m, plain = layer(48, 1, fmt), layer(48, 1, fmt)
    row = m.weight_packed.clone()
    gpu = FakeGpu()
    x = torch.randn(2, 3, K, dtype=torch.bfloat16)
    want = reference(plain, x)
    y = m._gpu_compute(gpu, x)
    assert gpu.calls[0] == "upload:tile" and m._tiled is m.weight_packed
    assert torch.equal(m.weight_packed, real_gpu.tile_permuted(row, m.fmt, K, torch))
    assert not torch.equal(m.weight_packed, row)
    assert torch.equal(y, want) and not y.isnan().any()
    # every way out gives the file's row order; none of them changes the buffer
    assert torch.equal(m.state_dict()["weight_packed"], row)
    assert torch.equal(m.state_dict(keep_vars=True)["weight_packed"], row)
    assert torch.equal(m.dequantize_weight(torch.float32), plain.dequantize_weight(torch.float32))
    assert torch.equal(m.weight, plain.weight)
    assert m._tiled is m.weight_packed
    # the op (a gradient for x): forward decodes on the CPU, backward through exmyconv::dequantize
    xg = torch.randn(3, K, requires_grad=True)
    m(xg).sum().backward()
    xp = xg.detach().clone().requires_grad_()
    plain(xp).sum().backward()
    assert torch.equal(xg.grad, xp.grad)
    # the op given the layer's own buffer with another bias: decoded in row order
    other = torch.ops.exmyconv.linear(x.float(), m.weight_packed, m.weight_scale, None, m._handle)
    assert torch.equal(other, torch.nn.functional.linear(x.float(), plain.dequantize_weight(torch.float32)))
    # a copy keeps track of its own buffer
    c = copy.deepcopy(m)
    assert c._tiled is c.weight_packed and torch.equal(c.state_dict()["weight_packed"], row)
    assert torch.equal(c._gpu_compute(FakeGpu(), x), want)


def test_loading_and_moving_lay_the_layer_out_again():
    m, other = layer(32, 1), layer(32, 2)
    gpu = FakeGpu()
    x = torch.randn(4, K, dtype=torch.float16)
    before = m.weight_packed
    m._gpu_compute(gpu, x)
    tiled = m.weight_packed
    assert tiled is not before and torch.equal(before, layer(32, 1).weight_packed)  # a new tensor; the old one as it was
    # load_state_dict copies row order into the buffer in tile order: laid out again, viewed anew
    m.load_state_dict(other.state_dict())
    assert m.weight_packed is tiled and m._tiled is tiled
    assert torch.equal(m.state_dict()["weight_packed"], other.weight_packed)
    assert torch.equal(m._gpu_compute(gpu, x), reference(other, x)) and gpu.calls.count("upload:tile") == 2
    # a state dict without the packed weight leaves it as it was
    m.load_state_dict({k: v for k, v in layer(32, 3).state_dict().items() if k != "weight_packed"}, strict=False)
    assert m._tiled is tiled and torch.equal(m.state_dict()["weight_packed"], other.weight_packed)
    # assign=True: the given tensor, in row order, until the next CUDA call lays out a copy (the given
    # tensor, here another layer's buffer, is left alone)
    fresh = layer(32, 4)
    given = fresh.state_dict()
    m.load_state_dict(given, assign=True)
    assert m._tiled is None and m.weight_packed is given["weight_packed"]
    assert torch.equal(m._gpu_compute(gpu, x), reference(fresh, x)) and m._tiled is m.weight_packed
    assert torch.equal(given["weight_packed"], layer(32, 4).weight_packed)
    # .to(): back in row order first (here it stays on the CPU, where nothing reorders it)
    m.to(torch.bfloat16)
    assert m._tiled is None and torch.equal(m.weight_packed, fresh.weight_packed)
    xb = x.bfloat16()
    assert torch.equal(m._gpu_compute(gpu, xb), reference(fresh.to(torch.bfloat16), xb))
    assert m._tiled is m.weight_packed


def test_shapes_tile_order_does_not_take_stay_in_row_order():
    for m in (layer(24, 1), layer(32, 1, k=200), layer(32, 1, fmt="e2m2s4")):
        row = m.weight_packed.clone()
        gpu = FakeGpu()
        x = torch.randn(2, m.in_features, dtype=torch.float16)
        y = m._gpu_forward(x) if m.fmt.share > 1 else m._gpu_compute(gpu, x)
        if m.fmt.share == 1:
            assert gpu.calls[0] == "upload:row"
            assert torch.equal(y, reference(m, x))
        assert m._tiled is None and torch.equal(m.weight_packed, row)


def attention(ns=(48, 16, 16)):
    q, k, v = (layer(n, i + 1, bias=i == 2) for i, n in enumerate(ns))
    return torch.nn.ModuleDict(dict(q_proj=q, k_proj=k, v_proj=v))


def test_a_sibling_group_of_tiled_members_is_tiled_as_a_whole():
    att, plain = attention(), attention()
    gpu = FakeGpu()
    for m in att.values():
        m.align_rows(gpu)
    assert all(m._tiled is m.weight_packed for m in att.values())
    group = SiblingGroup(list(att.values()))
    whole = group.fused.weight_packed
    assert group.fused._tiled is whole
    assert all(m._tiled is m.weight_packed for m in att.values())
    rows = torch.cat([m.weight_packed for m in plain.values()])
    assert torch.equal(whole, real_gpu.tile_permuted(rows, group.fused.fmt, K, torch))
    x = torch.randn(2, K, dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(group.fused._gpu_compute(gpu, x), reference(group.fused, x))
        assert gpu.calls[-2:] == ["upload:tile", "gemv:2"]
        for name, m in att.items():  # each member decodes its rows of the whole in row order
            assert torch.equal(m.state_dict()["weight_packed"], plain[name].weight_packed)
            assert torch.equal(m.dequantize_weight(torch.float32), plain[name].dequantize_weight(torch.float32))
        # loading into a member rewrites its tiles of the whole, in tile order
        new = layer(16, 9, bias=False)
        att["k_proj"].load_state_dict(new.state_dict())
        rows = torch.cat([plain["q_proj"].weight_packed, new.weight_packed, plain["v_proj"].weight_packed])
        assert torch.equal(whole, real_gpu.tile_permuted(rows, group.fused.fmt, K, torch))
        # dissolved, a member computes alone from its view, in tile order
        group.dissolve()
        assert torch.equal(att["v_proj"]._gpu_compute(FakeGpu(), x), reference(plain["v_proj"], x))
        # moved, a member's rows go back to row order (the group is gone)
        att["q_proj"].to(torch.float16)
        assert att["q_proj"]._tiled is None and torch.equal(att["q_proj"].weight_packed, plain["q_proj"].weight_packed)


def test_a_sibling_group_with_a_member_off_whole_tiles_stays_in_row_order():
    att, plain = attention((48, 24, 24)), attention((48, 24, 24))
    gpu = FakeGpu()
    for m in att.values():
        m.align_rows(gpu)
    assert att["q_proj"]._tiled is not None and att["k_proj"]._tiled is None  # 24 rows: not whole tiles
    group = SiblingGroup(list(att.values()))
    whole = group.fused.weight_packed
    assert group.fused._tiled is None and all(m._tiled is None for m in att.values())
    assert torch.equal(whole, torch.cat([m.weight_packed for m in plain.values()]))
    x = torch.randn(3, K, dtype=torch.float16)
    with torch.no_grad():
        group.fused._gpu_compute(gpu, x)  # the layer of all the rows may not reorder the members' views
        assert gpu.calls[-2] == "upload:row" and torch.equal(whole, torch.cat([m.weight_packed for m in plain.values()]))
        for name, m in att.items():
            m.align_rows(gpu)
            assert m._tiled is None
            assert torch.equal(m._gpu_compute(FakeGpu(), x), reference(plain[name], x))


def experts(seed: int, h: int = 128, i: int = 64, e: int = 3):
    """Packed experts whose gate_up (K = h = 128) takes tile order and whose down (K = i = 64) does not."""
    from exmyconv.torch.experts import ExmyExperts, ExpertWeights

    rng = np.random.default_rng(seed)
    specs, data = {}, {}
    for leaf, (n, k) in {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}.items():
        q = quantize(rng.standard_normal((e, n, k)).astype(np.float32) * 0.1, get_format("e3m2"), 32)
        specs[leaf] = ExpertWeights("e3m2", k, n, 32, torch.float16)
        data[leaf] = (torch.from_numpy(q.payload), torch.from_numpy(q.scales))
    module = ExmyExperts(e, specs["gate_up_proj"], specs["down_proj"], torch.nn.SiLU(), dtype=torch.float32)
    for leaf, (packed, scale) in data.items():
        getattr(module, leaf + "_packed").copy_(packed)
        getattr(module, leaf + "_scale").copy_(scale)
    return module


def test_experts_in_tile_order_give_row_order_back():
    """ExmyExperts.align_rows: each projection whose experts' rows are whole tiles and whose K takes tile
    order is replaced by its bytes in tile order (expert by expert: the stack of their tiles); outputs,
    decoded weights and state dicts are the row-order module's; loading and .to() as for ExmyLinear."""
    m, plain = experts(1), experts(1)
    rb = m.gate_up_proj_packed.shape[-1]
    m.align_rows(FakeGpu())
    assert m.order("gate_up_proj") == "tile" and m.order("down_proj") == "row"
    assert torch.equal(m.gate_up_proj_packed.view(-1, rb),
                       real_gpu.tile_permuted(plain.gate_up_proj_packed.view(-1, rb), m.weights["gate_up_proj"].fmt,
                                              128, torch))
    assert torch.equal(m.down_proj_packed, plain.down_proj_packed)
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(m.dequantize_weight(name), plain.dequantize_weight(name))
        assert torch.equal(m.dequantize_weight(name, 2), plain.dequantize_weight(name, 2))
    sd = m.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in plain.state_dict().items())
    x = torch.randn(5, 128)
    weights, index = torch.softmax(torch.randn(5, 3), -1).topk(2)
    want = plain(x, index, weights)
    assert torch.equal(m(x, index, weights), want) and not want.isnan().any()
    # the op given the row-order tensors of another module computes with those, as such
    op = torch.ops.exmyconv.experts
    assert torch.equal(op(x, index, weights, *plain._packed_buffers(), m._handle), want)
    c = copy.deepcopy(m)
    assert c.order("gate_up_proj") == "tile" and torch.equal(c(x, index, weights), want)
    # loading lays the new bytes out again; .to() goes back to row order
    other = experts(2)
    m.load_state_dict(other.state_dict())
    assert m.order("gate_up_proj") == "tile" and torch.equal(m(x, index, weights), other(x, index, weights))
    assert torch.equal(m.state_dict()["gate_up_proj_packed"], other.gate_up_proj_packed)
    m.to(torch.float64)
    assert m.order("gate_up_proj") == "row" and torch.equal(m.gate_up_proj_packed, other.gate_up_proj_packed)
