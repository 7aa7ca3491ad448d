"""--rounding gptq on CUDA (convert/gptq_torch.py): the numpy path's codes and scales, bit for bit.

Oracle: convert/gptq.py on numpy (itself checked against an unblocked GPTQ in tests/test_gptq.py).
Skipped with a reason without PyTorch seeing a CUDA GPU; EXMY_REQUIRE_GPU=1 (scripts/gpu-check)
turns that skip into a failure.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from exmyconv.cuda import device
from test_gptq import TORCH_CASES, correlated_hessian, torch_case

_REASON = device.torch_cuda_reason()
if _REASON and os.environ.get("EXMY_REQUIRE_GPU"):
    raise RuntimeError(f"EXMY_REQUIRE_GPU is set but the GPU path is unavailable: {_REASON}")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_REASON), reason=_REASON or "GPU present")]


@pytest.mark.parametrize("clip", [False, True], ids=["absmax", "clip"])
@pytest.mark.parametrize("name,group", TORCH_CASES, ids=[f"{f}-g{g}" if g else f for f, g in TORCH_CASES])
def test_cuda_gives_the_numpy_codes_and_scales(name, group, clip, rng):
    import torch

    from exmyconv.convert import gptq, gptq_torch

    fmt, w, g, sd, factor, importance = torch_case(rng, name, group)
    want = gptq.gptq_rows(w, fmt, g, sd, factor, clip, importance)
    got = gptq_torch.gptq_rows(w, fmt, g, sd, factor, clip, importance, torch.device("cuda"))
    assert np.isfinite(got[1]).all()
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("name,group", [("e2m2", None), ("e2m2s4", 128), ("e2m1", 32)])
def test_cuda_at_llm_size_and_the_backend_choice(name, group, rng):
    """A layer of a 1B-class model (2048 x 2048, K over several blocks): same output; the converter
    picks the CUDA path (search.rounding_backend); the times are printed."""
    import torch

    from exmyconv.convert import gptq, search
    from exmyconv.format.exmy import get_format
    from exmyconv.format.quant import choose_scale_dtype, group_amax, groups_of

    rows, k = 2048, 2048
    fmt = get_format(name)
    w = (rng.standard_normal((rows, k)) * 0.02).astype(np.float32)
    g, n = groups_of(k, group)
    sd = choose_scale_dtype(group_amax(w, g, n), fmt)
    factor = gptq.inverse_factor(correlated_hessian(rng, k))
    rounding, where = search.rounding_backend()
    assert where.startswith("cuda")
    began = time.perf_counter()
    got = rounding(w, fmt, g, sd, factor)
    torch.cuda.synchronize()
    cuda_s = time.perf_counter() - began
    began = time.perf_counter()
    want = gptq.gptq_rows(w, fmt, g, sd, factor)
    print(f"\n{name} g={g} {rows}x{k}: cuda {cuda_s:.2f} s, numpy {time.perf_counter() - began:.2f} s")
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_cuda_search_measures_gptq_errors_as_numpy(rng):
    """--format auto --rounding gptq on CUDA (search_torch.measure with a factor): numpy's error curve."""
    from exmyconv.convert import gptq, search, search_torch

    k = 320
    x = (rng.standard_normal((600, k)) * 0.03).astype(np.float32)
    h = correlated_hessian(rng, k)
    cands = search.parse_candidates("e2m1,e2m1-g32,e2m2s4,e2m2s4-g64,e2m3s3-g100,e2m2+clip")

    def chunks():
        yield from (x[:256], x[256:])

    factor = gptq.inverse_factor(h)
    want = search.measure(chunks, cands, h, factor)
    got = search_torch.measure(chunks, cands, h, factor)
    assert np.isfinite(got).all() and np.allclose(got, want, rtol=1e-9, atol=0)
