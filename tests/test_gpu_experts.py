"""ExmyExperts on CUDA: routed experts through the fused GEMV (few rows) or bit-exact dequantize + matmul.

Reference: the experts computed densely in float32 from the weights the torch codec decodes (what
``exmyconv dequantize`` writes), token by token over its top-k experts. Skipped with a reason without
CuPy, a CUDA GPU or CUDA torch (CI); EXMY_REQUIRE_GPU=1 (scripts/gpu-check) turns that skip into a failure.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from exmyconv.cuda import device

_REASON = device.bench_reason()
if _REASON and os.environ.get("EXMY_REQUIRE_GPU"):
    raise RuntimeError(f"EXMY_REQUIRE_GPU is set but the GPU path is unavailable: {_REASON}")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_REASON), reason=_REASON or "GPU present")]

E, H, I = 8, 1024, 512


def _experts(rng, fmt, group, dtype, scales8=False):
    """Random experts on CUDA (``.to`` lays their packed buffers out: tile order where it applies)."""
    return _cpu_experts(rng, fmt, group, scales8).to(device="cuda", dtype=dtype)


def _cpu_experts(rng, fmt, group, scales8=False):
    import torch

    from exmyconv.format.exmy import get_format
    from exmyconv.format.quant import quantize
    from exmyconv.torch.experts import ExmyExperts, ExpertWeights

    tensors = {}
    specs = {}
    for name, (n, k) in {"gate_up_proj": (2 * I, H), "down_proj": (H, I)}.items():
        q = quantize((rng.standard_normal((E, n, k)) * 0.03).astype(np.float32), get_format(fmt), group,
                     scales8=scales8)
        scale_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn}[q.scale_dtype]
        specs[name] = ExpertWeights(fmt, k, n, group, scale_dtype, q.scale_exp if scales8 else None)
        stored = q.scales * np.float32(2.0 ** -q.scale_exp)  # (8-bit: the e4m3 values; exact)
        tensors[name] = (torch.from_numpy(q.payload), torch.from_numpy(stored).to(scale_dtype))
    experts = ExmyExperts(E, specs["gate_up_proj"], specs["down_proj"], torch.nn.SiLU())
    for name, (packed, scale) in tensors.items():
        getattr(experts, name + "_packed").copy_(packed)
        getattr(experts, name + "_scale").copy_(scale)
    return experts


def _reference(experts, x, index, weights):
    """Dense float32: y_t = sum_j w_tj * down_e(silu(gate_e x_t) * up_e x_t), e = index[t, j]."""
    import torch

    gate_up = experts.dequantize_weight("gate_up_proj", None, torch.float32)
    down = experts.dequantize_weight("down_proj", None, torch.float32)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(index.shape[1]):
            e = int(index[t, j])
            gate, up = (gate_up[e] @ x[t].float()).chunk(2)
            y[t] += weights[t, j].float() * (down[e] @ (torch.nn.functional.silu(gate) * up))
    return y


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("fmt,group,scales8", [("e2m2", None, False), ("e2m2s4", 128, False), ("e2m2", 128, False),
                                              ("e2m1", 32, True)])
@pytest.mark.parametrize("path", ["routed", "grouped"])
def test_cuda_experts_match_the_dequantized_reference(rng, monkeypatch, dtype_name, tokens, fmt, group, scales8, path):
    """Both CUDA paths (one routed GEMV over all token-expert pairs; pairs grouped by expert: GEMVs of
    up to 16 rows, or dequantize + matmul for more) whatever the routing; 8-bit scales widened for the kernels."""
    import torch

    from exmyconv.torch import experts as module

    monkeypatch.setattr(module.ExmyExperts, "routed_pairs", lambda self, k: 10**9 if path == "routed" else -1)
    dtype = getattr(torch, dtype_name)
    experts = _experts(rng, fmt, group, dtype, scales8)
    top_k = 2 if tokens == 1 else 4
    x = torch.from_numpy(rng.standard_normal((tokens, H)).astype(np.float32)).to("cuda", dtype)
    logits = torch.from_numpy(rng.standard_normal((tokens, E)).astype(np.float32)).cuda()
    weights, index = torch.softmax(logits, -1).topk(top_k, dim=-1)
    weights = weights.to(dtype)
    with torch.no_grad():
        y = experts(x, index, weights)
    torch.cuda.synchronize()
    want = _reference(experts, x, index, weights)
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    err = ((y.float() - want).norm() / want.norm()).item()
    assert err < (4e-3 if dtype == torch.float16 else 2e-2), err
    # each token row on its own (a row never written would stand out here)
    rows = ((y.float() - want).norm(dim=1) / want.norm(dim=1))
    assert (rows < (1e-2 if dtype == torch.float16 else 4e-2)).all(), rows
    # the CPU path (decode + the eager transformers computation) agrees as well
    cpu = experts.to("cpu")(x.cpu(), index.cpu(), weights.cpu())
    assert ((cpu.float() - want.cpu()).norm() / want.norm().cpu()).item() < (4e-3 if dtype == torch.float16 else 2e-2)


# --------------------------------------------------------------------------- routed GEMV (graph-safe)

@pytest.mark.parametrize("fmt,group", [("e2m2", None), ("e3m2", 128), ("e2m1", 32)])
@pytest.mark.parametrize("path", ["routed", "grouped"])
def test_experts_in_tile_order_equal_row_order(rng, monkeypatch, fmt, group, path):
    """On CUDA the experts' packed buffers go to tile order at ``.to()`` (ExmyExperts.align_rows): the
    routed GEMV and the grouped path (GEMVs of each expert's rows, dequantize + matmul past 16) give the
    bits of the same experts kept in row order; state_dict gives the file's bytes back."""
    import copy

    import torch

    from exmyconv.torch import experts as module

    monkeypatch.setattr(module.ExmyExperts, "routed_pairs", lambda self, k: 10**9 if path == "routed" else -1)
    dtype = torch.bfloat16
    cpu = _cpu_experts(rng, fmt, group)
    cases = []
    for tokens in (1, 5, 40):
        x = torch.from_numpy(rng.standard_normal((tokens, H)).astype(np.float32)).to("cuda", dtype)
        logits = torch.from_numpy(rng.standard_normal((tokens, E)).astype(np.float32)).cuda()
        weights, index = torch.softmax(logits, -1).topk(4, dim=-1)
        cases.append((x, index, weights.to(dtype)))
    with torch.no_grad():
        with monkeypatch.context() as m:  # the twin never reorders its buffers
            m.setattr(module, "tile_ordered", lambda *args, **kwargs: None)
            row = copy.deepcopy(cpu).to(device="cuda", dtype=dtype)
            want = [row(*case) for case in cases]
        experts = cpu.to(device="cuda", dtype=dtype)
        got = [experts(*case) for case in cases]
    assert all(experts.order(name) == "tile" and row.order(name) == "row" for name in module.PROJECTIONS)
    for (x, _, _), g, w in zip(cases, got, want):
        assert not torch.isnan(g).any() and torch.equal(g, w), (fmt, group, path, x.shape[0])
    own, plain = experts.state_dict(), row.state_dict()
    assert all(torch.equal(own[k], v) for k, v in plain.items())


@pytest.mark.parametrize("tokens", [1, 40])
def test_cuda_experts_pass_gradients(rng, tokens):
    """With the hidden states and the routing weights requiring gradients (adapters, a trainable
    router), the experts give both the gradients of the dense reference (the fused GEMVs record
    nothing for autograd, so the layer takes its decode + F.linear path)."""
    import torch

    experts = _experts(rng, "e2m2", None, torch.float16)  # (fp16 activations: what the fused path takes)
    x = torch.from_numpy(rng.standard_normal((tokens, H)).astype(np.float32)).to("cuda", torch.float16)
    x.requires_grad_()
    logits = torch.from_numpy(rng.standard_normal((tokens, E)).astype(np.float32)).cuda()
    weights, index = torch.softmax(logits, -1).topk(2, dim=-1)
    weights = weights.to(torch.float16).requires_grad_()
    y = experts(x, index, weights)
    assert y.grad_fn is not None
    y.float().sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    _reference(experts, x2, index, w2).sum().backward()
    assert x.grad is not None and weights.grad is not None and not torch.isnan(x.grad).any()
    for got, want in ((x.grad, x2.grad), (weights.grad, w2.grad)):
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert err < 1e-2, err


def _routing(rng, tokens, top_k, dtype, sentinel=False):
    import torch

    logits = torch.from_numpy(rng.standard_normal((tokens, E)).astype(np.float32)).cuda()
    weights, index = torch.softmax(logits, -1).topk(top_k, dim=-1)
    if sentinel:  # an expert-parallel sentinel (an expert this rank does not hold): contributes nothing
        index[0, -1] = E
    return weights.to(dtype), index


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("fmt,group", [("e2m2", None), ("e2m2s4", 128), ("e2m2", 128), ("e3m2", None)])
def test_routed_gemv_rows_equal_the_expert_launches(rng, dtype_name, fmt, group):
    """gpu.RoutedGemvLaunch, pair by pair: row p is the batch-1 GEMV of expert ids[p] on x row p // x_div,
    bit for bit; a sentinel id gives a row of zeros; every row is written (y starts as NaN)."""
    import torch

    dtype = getattr(torch, dtype_name)
    experts = _experts(rng, fmt, group, dtype)
    stacked = experts._stacked_gemv("gate_up_proj")
    stream = torch.cuda.current_stream().cuda_stream
    tokens, top_k = 3, 4
    x = torch.from_numpy(rng.standard_normal((tokens, H)).astype(np.float32)).to("cuda", dtype)
    _, index = _routing(rng, tokens, top_k, dtype, sentinel=True)
    ids = index.reshape(-1).contiguous()
    pairs, n = tokens * top_k, 2 * I
    launch = stacked.routed(pairs, dtype, top_k)
    assert launch is not None and launch.kernel.routed
    y = torch.full((pairs, n), float("nan"), dtype=dtype, device="cuda")
    launch(ids.data_ptr(), x.data_ptr(), y.data_ptr(), stream)
    assert stacked.applies(1, dtype)
    for p, e in enumerate(ids.tolist()):
        if e >= E:
            assert torch.equal(y[p], torch.zeros_like(y[p])), p
            continue
        want = torch.full((1, n), float("nan"), dtype=dtype, device="cuda")
        stacked(e, 1, dtype, x[p // top_k].data_ptr(), want.data_ptr(), stream)
        assert torch.equal(y[p], want[0]), (p, e)
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_cuda_graph_of_the_experts_replays_any_routing(rng, dtype_name):
    """Captured once (torch.cuda.graph), replayed with routings written into the captured inputs: each
    replay equals the routed GEMV run eagerly on that routing bit for bit (the routing never left the
    GPU), and the eager forward (8 pairs > routed_pairs: the grouped path) within float noise."""
    import torch

    dtype = getattr(torch, dtype_name)
    experts = _experts(rng, "e2m2", None, dtype)
    tokens, top_k = 2, 4
    x = torch.zeros((tokens, H), dtype=dtype, device="cuda")
    weights, index = _routing(rng, tokens, top_k, dtype)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (an ordinary call): kernels compiled, launches prepared
            experts(x, index, weights)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = experts(x, index, weights)
        for sentinel in (False, False, True):
            w_new, i_new = _routing(rng, tokens, top_k, dtype, sentinel)
            x_new = torch.from_numpy(rng.standard_normal((tokens, H)).astype(np.float32)).to("cuda", dtype)
            x.copy_(x_new), index.copy_(i_new), weights.copy_(w_new)
            graph.replay()
            torch.cuda.synchronize()
            assert tokens * top_k > experts.routed_pairs(top_k)
            want = experts._routed_forward(x_new, i_new, w_new)
            assert torch.isfinite(y).all() and torch.equal(y, want)
            torch.testing.assert_close(y, experts(x_new, i_new, w_new), rtol=2e-2, atol=2e-2)


def test_reduce_overhead_compile_of_the_experts(rng):
    """torch.compile(mode="reduce-overhead", fullgraph=True): the experts op inside CUDA graphs, fresh
    routings per call, the eager values bit for bit."""
    import torch

    dtype = torch.bfloat16
    experts = _experts(rng, "e2m2", None, dtype)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, i, w: experts(x, i, w), mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for step in range(6):
            x = torch.from_numpy(rng.standard_normal((1, H)).astype(np.float32)).to("cuda", dtype)
            weights, index = _routing(rng, 1, 4, dtype)
            got = compiled(x, index, weights).clone()
            assert torch.equal(got, experts(x, index, weights)), step
    torch._dynamo.reset()


@pytest.mark.parametrize("tokens", [1, 40])
def test_experts_over_engine_tensors_on_cuda(rng, tokens):
    """ExmyExperts.over (what vLLM's packed MoE method builds) on CUDA tensors an engine owns, rows aligned
    first and then align_rows, as the method does: the same output as the module holding them itself, bit
    for bit; the engine's tensors stay the ones used (no copy) but for the packed ones in tile order, which
    align_rows laid out in new tensors (the method makes those its parameters) and left as they were."""
    import torch

    from exmyconv.torch.experts import PACKED_BUFFERS, ExmyExperts
    from exmyconv.torch.linear import kernel_rows

    own = _experts(rng, "e2m2", 128, torch.bfloat16)
    tensors = {name: t.clone() for name, t in own.state_dict().items() if name in PACKED_BUFFERS}  # (row order)
    tensors = {name: kernel_rows(t) if name.endswith("_packed") else t for name, t in tensors.items()}
    engine = ExmyExperts.over(own.weights["gate_up_proj"], own.weights["down_proj"], torch.nn.SiLU(), tensors,
                              torch.bfloat16)
    before = {name: t.clone() for name, t in tensors.items()}
    engine.align_rows()
    tiled = {name for name in PACKED_BUFFERS if name.endswith("_packed") and engine.order(name[:-len("_packed")]) == "tile"}
    assert tiled == {"gate_up_proj_packed", "down_proj_packed"}  # (e2m2, whole tiles: the test's point)
    x = torch.from_numpy(rng.standard_normal((tokens, H)).astype(np.float32)).to("cuda", torch.bfloat16)
    weights, index = _routing(rng, tokens, 2, torch.bfloat16)
    with torch.no_grad():
        got = engine(x, index, weights)
        want = own(x, index, weights)
    assert not torch.isnan(got).any() and torch.equal(got, want)
    assert all((engine._buffers[name] is tensors[name]) == (name not in tiled) for name in PACKED_BUFFERS)
    assert all(torch.equal(tensors[name], before[name]) for name in PACKED_BUFFERS)
