"""The torch codec (exmyconv.torch.codec) against the numpy reference (exmyconv.format), on the CPU."""
import numpy as np
import pytest
import torch

from exmyconv.format import dtypes, quant
from exmyconv.format.exmy import get_format
from exmyconv.torch import codec


@pytest.mark.parametrize("name", ["e2m2", "e2m1", "e3m2", "e4m3", "e2m0", "e1m0", "e5m2", "e2m2s4", "e2m3s3"])
def test_codes_match_reference(name, rng):
    fmt = get_format(name)
    y = (rng.standard_normal((8, 300)) * fmt.max / 3).astype(np.float32)
    y[0, :3] = [0.0, -0.0, fmt.max * 2]
    mags = fmt.table[: 2 ** (fmt.e + fmt.m)]
    ties = (mags[1:] + mags[:-1]) / 2
    y[1, : ties.size] = ties[:300]
    weight = rng.uniform(0.5, 2, y.shape)
    want = fmt.encode(y, weight if fmt.share > 1 else None)
    got = codec.encode(fmt, torch.from_numpy(y), torch.from_numpy(weight) if fmt.share > 1 else None)
    assert np.array_equal(got.numpy().astype(np.uint8), want)


@pytest.mark.parametrize("name", ["e2m2", "e3m2", "e4m3", "e5m2"])
def test_scales_match_reference_up_to_the_float32_limit(name, rng):
    """Same scale dtype and the same stored scales as the writer, including the groups whose
    rounded scale times max would overflow float32 (rounded one bf16 step down)."""
    fmt = get_format(name)
    amax = rng.uniform(1e-3, 1, (6, 5)).astype(np.float32)
    amax[0, 0] = 0.0
    amax[1, :] = np.finfo(np.float32).max  # weights at the float32 limit (e4m3: bf16 scales that overflow)
    amax[2, :2] = np.float32(1e-30)  # below fp16's range
    dtype = quant.choose_scale_dtype(amax, fmt)
    assert dtype == codec.scale_dtype(torch.from_numpy(amax), fmt) == "BF16"
    want = quant.scales_for(amax, fmt, dtype)
    if name == "e4m3":  # the round-down rule ran
        assert not np.array_equal(want, np.maximum(dtypes.round_to(amax / np.float32(fmt.max), dtype), want.min()))
    got = codec.scales_for(torch.from_numpy(amax), fmt, dtype).numpy()
    assert np.isfinite(got * np.float32(fmt.max)).all()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name,group", [("e2m2", None), ("e2m3s3", 64), ("e3m2", 48), ("e1m0", None)])
def test_dequantize_matches_reference(name, group, rng):
    fmt = get_format(name)
    x = (rng.standard_normal((7, 200)) * 0.05).astype(np.float32)
    q = quant.quantize(x, fmt, group)
    scales = torch.from_numpy(q.scales).to(codec.TORCH_DTYPE[q.scale_dtype])
    for dtype, code in ((torch.float32, "F32"), (torch.float16, "F16"), (torch.bfloat16, "BF16")):
        got = codec.dequantize(torch.from_numpy(q.payload), scales, fmt, 200, group, dtype)
        want = torch.from_numpy(q.dequantize(code)).to(dtype)
        assert got.dtype == dtype and not torch.isnan(got).any()
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)) if dtype != torch.float32 else torch.equal(got, want)
