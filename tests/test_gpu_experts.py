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


def _experts(rng, fmt, group, dtype):
    import torch

    from exmyconv.format.exmy import get_format
    from exmyconv.format.quant import quantize
    from exmyconv.torch.experts import ExmyExperts, ExpertWeights

    tensors = {}
    specs = {}
    for name, (n, k) in {"gate_up_proj": (2 * I, H), "down_proj": (H, I)}.items():
        q = quantize((rng.standard_normal((E, n, k)) * 0.03).astype(np.float32), get_format(fmt), group)
        scale_dtype = torch.float16 if q.scale_dtype == "F16" else torch.bfloat16
        specs[name] = ExpertWeights(fmt, k, n, group, scale_dtype)
        tensors[name] = (torch.from_numpy(q.payload), torch.from_numpy(q.scales).to(scale_dtype))
    experts = ExmyExperts(E, specs["gate_up_proj"], specs["down_proj"], torch.nn.SiLU())
    for name, (packed, scale) in tensors.items():
        getattr(experts, name + "_packed").copy_(packed)
        getattr(experts, name + "_scale").copy_(scale)
    return experts.to(device="cuda", dtype=dtype)


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
@pytest.mark.parametrize("fmt,group", [("e2m2", None), ("e2m2s4", 128), ("e2m2", 128)])
@pytest.mark.parametrize("path", ["pairwise", "grouped"])
def test_cuda_experts_match_the_dequantized_reference(rng, monkeypatch, dtype_name, tokens, fmt, group, path):
    """Both CUDA paths (one GEMV per token-expert pair; pairs grouped by expert: GEMVs of up to 16
    rows, or dequantize + matmul for more) whatever the routing."""
    import torch

    from exmyconv.torch import experts as module

    monkeypatch.setattr(module, "PAIRWISE_REPEATS", 10**9 if path == "pairwise" else -1)
    dtype = getattr(torch, dtype_name)
    experts = _experts(rng, fmt, group, dtype)
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
