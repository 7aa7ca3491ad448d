"""GPU kernels (kernels/*.cu through exmyconv.cuda.gpu): bit-exact dequantization and the fused GEMV.

Skipped with a reason when CuPy or a CUDA GPU is missing (CI); EXMY_REQUIRE_GPU=1 (set by
scripts/gpu-check) turns that skip into a failure. Every comparison of dequantized values is on raw
bits (uint16/uint32) of every element against QTensor.dequantize, into outputs poisoned with NaN
patterns first so that an element the kernel did not write shows up.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from exmyconv.format import dtypes

from exmyconv.cuda import device, gpu
from exmyconv.format.exmy import NAMED, NAMED_SHARED, ExMy, all_formats, get_format
from exmyconv.format.pack import pack_codes, unpack_codes
from exmyconv.format.quant import QTensor, quantize

_REASON = gpu.unavailable_reason()
if _REASON and os.environ.get("EXMY_REQUIRE_GPU"):
    raise RuntimeError(f"EXMY_REQUIRE_GPU is set but the GPU path is unavailable: {_REASON}")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_REASON), reason=f"needs CuPy and a CUDA GPU: {_REASON}")]

ALL = [f.name for f in all_formats()]
POISON = {"F16": 0x7E5A, "BF16": 0x7FA5, "F32": 0x7FC0_5A5A}  # NaN patterns the kernels never write


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


# ----------------------------------------------------------------------------- helpers

def ref_bits(qt: QTensor, out_dtype: str) -> np.ndarray:
    """Raw bits of the CPU reference dequantization."""
    v = qt.dequantize(out_dtype)
    if out_dtype == "F16":
        return v.astype(np.float16).view(np.uint16)
    if out_dtype == "BF16":
        return dtypes.bf16_bits(v)
    return np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)


def poisoned(cp, shape, out_dtype):
    if out_dtype == "F32":
        return cp.full(shape, POISON["F32"], dtype=cp.uint32).view(cp.float32)
    raw = cp.full(shape, POISON[out_dtype], dtype=cp.uint16)
    return raw.view(cp.float16) if out_dtype == "F16" else raw


def gpu_bits(cp, qt: QTensor, out_dtype: str, scales=None) -> np.ndarray:
    out = poisoned(cp, qt.shape, out_dtype)
    got = gpu.dequantize(qt.payload, qt.scales if scales is None else scales, qt.scale_dtype, qt.fmt,
                         qt.shape[-1], qt.group_size, out_dtype, out=out)
    assert got is out
    host = cp.asnumpy(got)
    return host.view(np.uint32 if out_dtype == "F32" else np.uint16)


def assert_same_bits(got: np.ndarray, want: np.ndarray, what: str):
    assert got.shape == want.shape, what
    bad = got != want
    if bad.any():
        idx = np.argwhere(bad)[:5]
        detail = ", ".join(f"{tuple(i)}: got {got[tuple(i)]:#x} want {want[tuple(i)]:#x}" for i in idx)
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.size} elements differ ({detail})")


def random_scales(rng, shape, scale_dtype: str, fmt: ExMy, wide: bool) -> np.ndarray:
    """Scale values exact in scale_dtype; `wide` spans the dtype's whole normal range."""
    if scale_dtype == "F16":
        lo, hi = (-14, 15) if wide else (-12, np.log2(60000 / fmt.max))
        s = np.exp2(rng.uniform(lo, hi, shape)).astype(np.float32)
        return np.maximum(dtypes.round_to(s, "F16"), np.float32(2.0**-14))
    lo, hi = (-126, 120) if wide else (-20, 10)
    s = np.exp2(rng.uniform(lo, hi, shape)).astype(np.float32)
    return np.maximum(dtypes.round_to(s, "BF16"), np.float32(2.0**-126))


def qtensor_from_codes(codes: np.ndarray, scales: np.ndarray, fmt: ExMy, g: int, scale_dtype: str) -> QTensor:
    lead = codes.shape[:-1]
    return QTensor(fmt, tuple(codes.shape), g, pack_codes(codes.reshape(-1, codes.shape[-1]), fmt).reshape(*lead, -1),
                   scales, scale_dtype)


# ----------------------------------------------------------------------------- environment

def test_kernels_compiled_for_this_device(cp):
    fn = gpu.kernel("dequant.cu", "exmy_dequant_s16_o16", get_format("e2m2"))
    major, minor = device._capability()
    assert fn.attributes["binary_version"] == 10 * major + minor  # a cubin for this arch, not PTX JIT
    assert gpu.device_info()["arch"] == f"sm_{major}{minor}"


# ----------------------------------------------------------------------------- dequantization

@pytest.mark.parametrize("name", ALL)
def test_every_code_every_format(cp, rng, name):
    """A row holds every code (in a random order) several times; all scale/output dtypes."""
    fmt = get_format(name)
    ncodes = 1 << fmt.bits
    k = max(3 * ncodes + 5, 135)  # spans several chunks and a padded tail
    rows = 6
    codes = np.stack([np.resize(rng.permutation(ncodes), k) for _ in range(rows)]).astype(np.uint8)
    for scale_dtype in ("F16", "BF16"):
        for g in (k, 32, 100):
            ng = -(-k // g)
            # wide scales: products that overflow fp16 (-> inf) and that are fp32 subnormals
            scales = random_scales(rng, (rows, ng), scale_dtype, fmt, wide=True)
            qt = qtensor_from_codes(codes, scales, fmt, g, scale_dtype)
            for out_dtype in ("F16", "BF16", "F32"):
                assert_same_bits(gpu_bits(cp, qt, out_dtype), ref_bits(qt, out_dtype),
                                 f"{name} scales {scale_dtype} G={g} -> {out_dtype}")


@pytest.mark.parametrize("name", NAMED + ("e1m0", "e1m5", "e5m2", "e3m3"))
@pytest.mark.parametrize("k", [1, 100, 129, 384, 4099])
def test_random_tensors(cp, rng, name, k):
    fmt = get_format(name)
    rows = int(rng.integers(1, 9))
    x = (rng.standard_normal((rows, k)) * rng.uniform(1e-3, 1.0)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] = 0.0  # a few exact zeros
    for group in (None, 32, 64, 128, 100):
        qt = quantize(x, fmt, group)
        for out_dtype in ("F16", "BF16"):
            assert_same_bits(gpu_bits(cp, qt, out_dtype), ref_bits(qt, out_dtype),
                             f"{name} K={k} group={group} ({qt.scale_dtype}) -> {out_dtype}")


@pytest.mark.parametrize("name", ["e2m2", "e4m3", "e5m1"])
def test_3d_weights_and_scale_inputs(cp, rng, name):
    """3-D (MoE-like) weights; scales given as float32, raw uint16 bits, cupy and torch arrays."""
    fmt = get_format(name)
    x = (rng.standard_normal((3, 5, 200)) * 0.05).astype(np.float32)
    qt = quantize(x, fmt, 64)
    want = ref_bits(qt, "F16")
    stored = dtypes.store(qt.scales, qt.scale_dtype).view(np.uint16)  # what safetensors holds
    variants = [qt.scales, stored, cp.asarray(stored), cp.asarray(qt.scales)]
    try:
        import torch

        t = torch.from_numpy(stored.view(np.int16).copy())
        variants.append(t.view(torch.float16 if qt.scale_dtype == "F16" else torch.bfloat16))
        if torch.cuda.is_available():
            variants.append(variants[-1].cuda())
    except ImportError:
        pass
    for s in variants:
        assert_same_bits(gpu_bits(cp, qt, "F16", scales=s), want, f"{name} 3-D, scales {type(s).__name__}")
    w = gpu.upload(qt)
    got = w.dequantize("BF16")
    assert got.shape == qt.shape
    assert_same_bits(cp.asnumpy(got), ref_bits(qt, "BF16"), f"{name} GpuWeight.dequantize")


def test_fresh_random_large(cp, rng):
    """A bigger fresh tensor per named format, both output types (many blocks per launch)."""
    for name in NAMED:
        fmt = get_format(name)
        n, k = int(rng.integers(200, 600)), int(rng.integers(1000, 5000))
        x = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
        qt = quantize(x, fmt, None if rng.random() < 0.5 else 128)
        for out_dtype in ("F16", "BF16"):
            assert_same_bits(gpu_bits(cp, qt, out_dtype), ref_bits(qt, out_dtype), f"{name} {n}x{k}")


# ----------------------------------------------------------------------------- shared formats

# every shared-bit expansion path (k = 2, 4, 8 bit spreads; k = 3, 5, 6, 7 the general one), every
# plane combination of the own bits (4; 4+1; 4+2; 4+2+1; 2; 2+1), E = 5 and E = 1
# every shared-bit path: k = 2, 4, 8 spreads, k = 3, 5, 6, 7 the general one, and the nibble-only
# formats (4 own bits: e2m2sk, e1m3sk, e3m1sk) with their own grouping for k = 4, even and odd k
SHARED_SAMPLE = NAMED_SHARED + ("e1m1s2", "e2m1s3", "e1m2s5", "e3m2s6", "e4m3s7", "e5m2s8", "e3m3s4", "e2m5s2",
                                "e2m2s2", "e2m2s3", "e2m2s8", "e1m3s5", "e3m1s7")


@pytest.mark.parametrize("name", SHARED_SAMPLE)
def test_every_code_shared_formats(cp, rng, name):
    """Every code (each at the start of some group, so its m0 is the group's) in a random order,
    random codes elsewhere; all scale/output dtypes, aligned and unaligned scale groups."""
    fmt = get_format(name)
    ncodes = 1 << fmt.bits
    k = max(fmt.share * (2 * ncodes + 3) + 1, 301)  # several chunks and a padded tail
    rows = 5
    codes = rng.integers(0, ncodes, (rows, k)).astype(np.uint8)
    for r in range(rows):
        starts = codes[r, ::fmt.share]
        starts[:] = np.resize(rng.permutation(ncodes), starts.size)
        codes[r, ::fmt.share] = starts
    for scale_dtype in ("F16", "BF16"):
        for g in (k, 32, 100):
            scales = random_scales(rng, (rows, -(-k // g)), scale_dtype, fmt, wide=True)
            qt = qtensor_from_codes(codes, scales, fmt, g, scale_dtype)
            stored = unpack_codes(qt.payload, fmt, k)
            assert set(np.unique(stored[:, ::fmt.share]).tolist()) == set(range(ncodes))
            for out_dtype in ("F16", "BF16", "F32"):
                assert_same_bits(gpu_bits(cp, qt, out_dtype), ref_bits(qt, out_dtype),
                                 f"{name} scales {scale_dtype} G={g} -> {out_dtype}")


@pytest.mark.parametrize("name", NAMED_SHARED + ("e3m2s5", "e2m3s2"))
@pytest.mark.parametrize("k", [1, 100, 129, 300, 4099])
def test_random_tensors_shared(cp, rng, name, k):
    """Fresh quantized tensors of shared formats: per channel and group scales, odd K."""
    fmt = get_format(name)
    rows = int(rng.integers(1, 9))
    x = (rng.standard_normal((rows, k)) * rng.uniform(1e-3, 1.0)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] = 0.0
    for group in (None, 32, 64, 128, 100):
        qt = quantize(x, fmt, group)
        for out_dtype in ("F16", "BF16"):
            assert_same_bits(gpu_bits(cp, qt, out_dtype), ref_bits(qt, out_dtype),
                             f"{name} K={k} group={group} ({qt.scale_dtype}) -> {out_dtype}")


@pytest.mark.parametrize("name", NAMED_SHARED)
def test_shared_3d_and_large(cp, rng, name):
    """3-D weights, and a bigger fresh tensor (many blocks), of the named shared formats."""
    fmt = get_format(name)
    x = (rng.standard_normal((3, 5, 200)) * 0.05).astype(np.float32)
    for group in (None, 64):
        qt = quantize(x, fmt, group)
        for out_dtype in ("F16", "BF16"):
            assert_same_bits(gpu_bits(cp, qt, out_dtype), ref_bits(qt, out_dtype), f"{name} 3-D G={group}")
        w = gpu.upload(qt)
        assert_same_bits(cp.asnumpy(w.dequantize("BF16")), ref_bits(qt, "BF16"), f"{name} GpuWeight.dequantize")
    n, k = int(rng.integers(200, 600)), int(rng.integers(1000, 5000))
    x = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    qt = quantize(x, fmt, None if rng.random() < 0.5 else 128)
    for out_dtype in ("F16", "BF16"):
        assert_same_bits(gpu_bits(cp, qt, out_dtype), ref_bits(qt, out_dtype), f"{name} {n}x{k}")


def test_supports():
    assert all(gpu.supports_dequant(f) for f in all_formats() + all_formats(shared=True))
    assert all(gpu.supports(f) for f in all_formats())
    for name in gpu.GEMV_SHARED:
        assert gpu.supports(name)


def test_bad_arguments(cp):
    from exmyconv.errors import ExmyError

    qt = quantize(np.ones((4, 64), np.float32), get_format("e2m2"))
    with pytest.raises(ExmyError):
        gpu.dequantize(qt.payload[:, :-1], qt.scales, "F16", "e2m2", 64, None)
    with pytest.raises(ExmyError):
        gpu.dequantize(qt.payload, qt.scales, "F16", "e2m2", 64, None, "F64")
    with pytest.raises(ExmyError):
        gpu.dequantize(qt.payload, qt.scales[:2], "F16", "e2m2", 64, None)


# ----------------------------------------------------------------------------- GEMV

# |y - ref| / |ref| vs float64 x . dequant(W)^T (docs/kernels.md): fp16 operands (x fp16, scales
# F16, E <= 4) / bf16 operands (x bf16, or BF16 scales, or E = 5)
TOL = {"F16": 2e-3, "BF16": 1e-2}


def gemv_check(cp, rng, fmt: ExMy, n: int, k: int, batch: int, x_dtype: str, group=None, qt=None,
               use_torch=True, scale=0.05, x_scale=1.0, order=None):
    import torch

    if qt is None:
        w = (rng.standard_normal((n, k)) * scale).astype(np.float32)
        qt = quantize(w, fmt, group)
    weight = gpu.upload(qt, order=order)
    tdt = torch.float16 if x_dtype == "F16" else torch.bfloat16
    x = torch.from_numpy((rng.standard_normal((batch, k)) * x_scale).astype(np.float32)).to("cuda", tdt)
    x64 = x.double().cpu().numpy()
    w64 = qt.dequantize("F32").reshape(-1, k).astype(np.float64)
    ref = x64 @ w64.T
    if use_torch:
        y = torch.full((batch, weight.n), float("nan"), dtype=tdt, device="cuda")  # poisoned
        got = gpu.gemv(x, weight, out=y)
        assert got is y
        y64 = y.double().cpu().numpy()
    else:
        xc = cp.asarray(x.view(torch.int16).cpu().numpy()).view(cp.uint16)
        if x_dtype == "F16":
            xc = xc.view(cp.float16)
        y = gpu.gemv(xc, weight, x_dtype=x_dtype)
        yh = cp.asnumpy(y)
        y64 = yh.astype(np.float64) if x_dtype == "F16" else dtypes.to_float32(yh, "BF16").astype(np.float64)
    assert y64.shape == (batch, weight.n)
    assert np.isfinite(y64).all(), "unwritten (NaN) or non-finite outputs"
    err = np.linalg.norm(y64 - ref) / max(np.linalg.norm(ref), 1e-30)
    kernel = gpu.gemv_kernel(weight, x_dtype, min(batch, 16))
    tol = TOL["BF16"] if kernel.mode >= 2 else TOL["F16"]  # bf16 tensor-core operands: bf16 tolerance
    assert err <= tol, f"{fmt.name} {n}x{k} B={batch} x {x_dtype} ({kernel.name}): rel error {err:.2e}"
    return err, kernel, weight, x, y64, x64


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("x_dtype", ["F16", "BF16"])
def test_gemv_named_formats(cp, rng, name, x_dtype):
    fmt = get_format(name)
    for batch in (1, 2, 3, 5, 8, 9, 13, 16):
        n = int(rng.integers(1, 300))
        k = int(rng.choice([int(rng.integers(1, 700)), 128 * int(rng.integers(1, 12)), 4096]))
        gemv_check(cp, rng, fmt, n, k, batch, x_dtype)


@pytest.mark.parametrize("name", ALL)
def test_gemv_every_format(cp, rng, name):
    fmt = get_format(name)
    for x_dtype in ("F16", "BF16"):
        gemv_check(cp, rng, fmt, 70, 1000, 4, x_dtype)
        gemv_check(cp, rng, fmt, 33, 512, 12, x_dtype, use_torch=False)


def test_gemv_error_bound_per_element(cp, rng):
    """fp16 operands: one scale per row -> the mma multiplies the exact code values and scales the
    float32 sums; aligned groups -> it multiplies exactly the F16-dequantized weights. Either way
    each y differs from float64 x . W^T by at most the float32 summation error plus one fp16
    rounding of y."""
    fmt = get_format("e2m2")
    for group, groups in ((None, 0), (128, 1)):
        for batch in (1, 7, 16):
            err, kernel, weight, x, y64, x64 = gemv_check(cp, rng, fmt, 257, 3000, batch, "F16", group=group)
            assert (kernel.mode, kernel.x_dtype, kernel.groups) == (0, "F16", groups), kernel  # fp16, folded
            if group is None:
                w = cp.asnumpy(weight.dequantize("F32")).astype(np.float64)
            else:
                w = cp.asnumpy(weight.dequantize("F16")).astype(np.float64)
            ref = x64 @ w.T
            bound = 2.0**-11 * np.abs(ref) + 1e-4 * (np.abs(x64) @ np.abs(w).T) + 2.0**-24
            assert (np.abs(y64 - ref) <= bound).all(), f"group {group} batch {batch}"


@pytest.mark.parametrize("name", [*NAMED, *gpu.GEMV_SHARED])
def test_gemv_bf16_row_scale_one_hot_is_exact(cp, rng, name):
    """Mode 3 (bf16 operands, one scale per row applied to the float32 sums) and mode 5 (x converted to
    scaled fp16 first, fp16 operands; the host's for large layers): with one-hot rows of x each output
    is one weight, v * scale rounded once, which must be bit for bit the dequantized
    weight (every code appears, subnormal ones included: the exact power-of-two decode multiply is
    what this checks; -0 reads as +0, the sum of the row's other, +0, products); a NaN-poisoned
    output shows any element not written."""
    import torch

    fmt = get_format(name)
    ncodes = 1 << fmt.bits
    n, k = 40, max(3 * ncodes + 5, 135)
    codes = np.stack([np.resize(rng.permutation(ncodes), k) for _ in range(n)]).astype(np.uint8)
    for x_dtype in ("BF16",):  # mode 3 runs for bf16 x and E <= 4 only (gpu.gemv_kernel)
        for scale_dtype in ("F16", "BF16"):
            qt = qtensor_from_codes(codes, random_scales(rng, (n, 1), scale_dtype, fmt, wide=False), fmt, k,
                                    scale_dtype)
            weight = gpu.upload(qt)
            tdt = torch.float16 if x_dtype == "F16" else torch.bfloat16
            want = ref_bits(qt, x_dtype).reshape(n, k)
            want = np.where(want == 0x8000, 0, want)  # a sum of +0 products and -0 is +0
            for c0 in range(0, k, 16):
                b = min(16, k - c0)
                x = torch.zeros((b, k), dtype=tdt, device="cuda")
                x[torch.arange(b), c0 + torch.arange(b)] = 1.0
                for mode in (3, 5):
                    y = torch.full((b, n), float("nan"), dtype=tdt, device="cuda")
                    gpu.gemv_plan(x, weight, y, mode=mode)()
                    got = y.view(torch.int16).cpu().numpy().view(np.uint16)
                    assert np.array_equal(got, want[:, c0:c0 + b].T), \
                        f"{name} x {x_dtype} scales {scale_dtype} cols {c0}+ mode {mode}"


def random_row_scaled(rng, fmt, k: int, scale_dtype: str):
    """(n, the GPU weight, its float64 values): 1..299 rows of random codes with one scale per row."""
    n = int(rng.integers(1, 300))
    codes = rng.integers(0, 1 << fmt.bits, (n, k)).astype(np.uint8)
    qt = qtensor_from_codes(codes, random_scales(rng, (n, 1), scale_dtype, fmt, wide=False), fmt, k, scale_dtype)
    return n, gpu.upload(qt), qt.dequantize("F32").reshape(n, k).astype(np.float64)


@pytest.mark.parametrize("name", ["e2m2", "e2m1", "e3m2", "e2m3", "e4m3", "e2m2s4", "e2m3s3"])
def test_gemv_bf16_x_as_scaled_fp16_gives_mode_3_bits(cp, rng, name):
    """Mode 4 (the host's choice for b1 / b1r: bf16 x as fp16 times 2^s, fp16 operands) computes mode 3's
    products and sums times a power of two, so with x of ordinary range (nothing below 2^-29 of the
    largest |x|) its outputs are mode 3's bit for bit: fresh K (multiples of 8 and not: the staging's
    element path), F16 and BF16 scales, outputs poisoned with NaN. x of any range stays finite and
    within the bf16 bound (|x| up to 3e5, beyond fp16's 65504; rows of zeros; subnormal x), and
    other launches cannot switch between modes 3 and 4."""
    import torch

    from exmyconv.errors import ExmyError

    fmt = get_format(name)
    # b1 (staged x; K multiple of 8 or not), b1r (x window; K multiple of 8 or not: no main loop)
    for k in (32 * int(rng.integers(2, 400)), int(rng.integers(1, 4000)), 4096, 13440 + 8 * int(rng.integers(0, 400)),
              13400 + int(rng.integers(1, 8))):
        for scale_dtype in ("F16", "BF16"):
            n, weight, w64 = random_row_scaled(rng, fmt, k, scale_dtype)
            for x_range in ("normal", "huge", "zero", "tiny"):
                x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
                if x_range == "huge":
                    x[0, int(rng.integers(0, k))] = 3e5
                    x *= 1e3
                elif x_range == "zero":
                    x.zero_()
                elif x_range == "tiny":
                    x = (x.float() * 1e-38).to(torch.bfloat16)  # bf16 subnormals and zeros
                outs = {}
                for mode in (3, 4):
                    y = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                    plan = gpu.gemv_plan(x, weight, y, mode=mode)
                    assert plan.kernel.kind == ("b1" if k < 13000 else "b1r"), plan.kernel
                    assert plan.kernel.mode == mode, plan.kernel
                    plan()
                    outs[mode] = y
                what = f"{name} {n}x{k} scales {scale_dtype} x {x_range}"
                y64 = outs[4].double().cpu().numpy()
                assert np.isfinite(y64).all(), f"{what}: unwritten or non-finite outputs"
                ref = x.double().cpu().numpy() @ w64.T
                err = np.linalg.norm(y64 - ref) / max(np.linalg.norm(ref), 1e-300)
                assert err <= TOL["BF16"] or np.linalg.norm(ref) < 1e-30, f"{what}: rel error {err:.2e}"
                if x_range in ("normal", "zero"):
                    assert torch.equal(outs[4].view(torch.int16), outs[3].view(torch.int16)), f"{what}: not mode 3's bits"
    weight = gpu.upload(quantize(rng.standard_normal((64, 256)).astype(np.float32), fmt, None))
    for x_dtype, batch, kwargs in (("F16", 1, {}), ("BF16", 2, {}), ("BF16", 1, {"kind": None, "mode": 2})):
        x = torch.zeros((batch, 256), dtype=torch.float16 if x_dtype == "F16" else torch.bfloat16, device="cuda")
        with pytest.raises(ExmyError, match="mode"):
            gpu.gemv_plan(x, weight, torch.empty((batch, 64), dtype=x.dtype, device="cuda"), **{"mode": 4, **kwargs})


@pytest.mark.parametrize("name", ["e2m2", "e3m2", "e2m2s4"])  # (1-bit plane, E = 3, shared bits: 11 builds each)
def test_gemv_bf16_x_prescaled_gives_mode_3_bits(cp, rng, name, monkeypatch):
    """Mode 5 (the host's choice at batch 2..16 for large layers: each row of bf16 x converted by
    exmy_x_tiles to fp16 times its own 2^s into x tiles, fp16 operands) gives mode 3's bits for x of ordinary range, also when the rows are
    2^+-60 apart: every batch kind, fresh K (multiples of 8 and not), F16 and BF16 scales, NaN-poisoned
    outputs, through gemv_plan and through a GemvLaunch with a torch workspace (programmatic dependent
    launch where the GPU has it). Rows of any range (beyond fp16's 65504, zeros, subnormals) stay finite
    and within the bf16 bound."""
    import torch

    fmt = get_format(name)
    overlap = torch.cuda.get_device_capability() >= (9, 0)  # programmatic dependent launch
    monkeypatch.setattr(gpu, "X16_MIN_WEIGHTS", {False: 0, True: 0})  # (the GemvLaunch: mode 5 for small layers too)
    for k in (32 * int(rng.integers(2, 200)), int(rng.integers(1, 3000)), 4096):
        for scale_dtype in ("F16", "BF16"):
            n, weight, w64 = random_row_scaled(rng, fmt, k, scale_dtype)
            for batch, kind in ((2, "nt1"), (5, "nt1w"), (8, "nt1"), (9, "nt2"), (13, "nt2w"), (16, "nt2")):
                for x_range in ("normal", "mixed"):
                    x = torch.randn(batch, k, device="cuda")
                    x *= torch.exp2(torch.randint(-60, 61, (batch, 1), device="cuda").float())
                    x = x.to(torch.bfloat16)
                    if x_range == "mixed":  # a huge row, a row of zeros, a subnormal row
                        x[0, int(rng.integers(0, k))] = 3e5
                        x[0] *= 1e3
                        x[1].zero_()
                        if batch > 2:
                            x[2] = (x[2].float() * 1e-38).to(torch.bfloat16)
                    outs = {}
                    for mode in (3, 5):
                        y = torch.full((batch, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                        plan = gpu.gemv_plan(x, weight, y, kind=kind, mode=mode)
                        assert (plan.kernel.kind, plan.kernel.mode) == (kind, mode), plan.kernel
                        plan()
                        outs[mode] = y
                    launch = gpu.GemvLaunch(weight, "BF16", batch, overlap=overlap)
                    assert launch.kernel.mode == 5 and launch.work_bytes >= batch * k * 2 + 4 * batch, launch.kernel
                    work = torch.full((launch.work_bytes,), 0xFF, dtype=torch.uint8, device="cuda")
                    y = torch.full((batch, n), float("nan"), dtype=torch.bfloat16, device="cuda")
                    launch(x.data_ptr(), y.data_ptr(), torch.cuda.current_stream().cuda_stream, work.data_ptr())
                    torch.cuda.synchronize()
                    what = f"{name} {n}x{k} batch {batch} {kind} scales {scale_dtype} x {x_range}"
                    y64 = outs[5].double().cpu().numpy()
                    assert np.isfinite(y64).all(), f"{what}: unwritten or non-finite outputs"
                    ref = x.double().cpu().numpy() @ w64.T
                    for b in range(batch):
                        nb = np.linalg.norm(ref[b])
                        err = np.linalg.norm(y64[b] - ref[b]) / max(nb, 1e-300)
                        assert err <= TOL["BF16"] or nb < 1e-30, f"{what} row {b}: rel error {err:.2e}"
                    if x_range == "normal":
                        assert torch.equal(outs[5].view(torch.int16), outs[3].view(torch.int16)), f"{what}: not mode 3's bits"
                    if launch.kernel.kind == kind:  # (the host's kind: the same launch as the plan's)
                        assert torch.equal(y.view(torch.int16), outs[5].view(torch.int16)), f"{what}: GemvLaunch differs"
                    else:
                        assert torch.isfinite(y).all(), f"{what}: GemvLaunch left outputs unwritten"


@pytest.mark.parametrize("name", gpu.GEMV_SHARED)
def test_gemv_shared_formats(cp, rng, name):
    """Fused GEMV of the shared formats gpu.supports: every kernel kind, groups, odd K."""
    fmt = get_format(name)
    for x_dtype in ("F16", "BF16"):
        for batch in (1, 3, 8, 9, 16):
            for group in (None, 128, 100):
                k = int(rng.choice([int(rng.integers(1, 700)), 4096, 1000]))
                gemv_check(cp, rng, fmt, int(rng.integers(1, 300)), k, batch, x_dtype, group=group)
    _, kernel, *_ = gemv_check(cp, rng, fmt, 40, 45000, 1, "F16")
    assert kernel.kind == "b1r", kernel


@pytest.mark.parametrize("name", ["e2m2", "e2m1", "e3m2", "e4m3", "e2m3", "e2m2s4", "e2m3s3"])
def test_gemv_b1r_x_window(cp, rng, name):
    """Batch 1 with large K (b1r kernels: two register sets in turn; for formats with a 1-bit plane
    or shared bits, x of the next iteration parked in a shared-memory window as pair words).
    Checked against float64 and, bit for bit, against the same kernel built to read x straight from
    global memory (GEMV_XWIN=0: same products in the same order) and against its 3-blocks-per-SM
    build (one register set, same order; gpu.gemv_b1r_blocks). K tails, unaligned x rows (no
    window), slices of few iterations and scale groups included."""
    import torch

    fmt = get_format(name)
    cases = ((None, 45056), (None, 13312 + 8 * int(rng.integers(0, 100))), (128, 20000 + 8 * int(rng.integers(0, 999))),
             (100, 16448), (None, 14003))
    for group, k in cases:
        n = int(rng.integers(1, 200))
        for x_dtype in ("F16", "BF16") if group is None else ("F16",):
            _, kernel, weight, x, y64, _ = gemv_check(cp, rng, fmt, n, k, 1, x_dtype, group=group)
            assert kernel.kind == "b1r", kernel
            direct = torch.full((1, n), float("nan"), dtype=x.dtype, device="cuda")
            gpu.gemv_plan(x, weight, direct, defines=("GEMV_XWIN=0",))()
            windowed = torch.full_like(direct, float("nan"))
            gpu.gemv_plan(x, weight, windowed)()
            assert torch.equal(windowed.view(torch.int16), direct.view(torch.int16)), f"{name} k={k} {group} {x_dtype}"
            assert np.array_equal(windowed.double().cpu().numpy(), y64)
            three = torch.full_like(direct, float("nan"))
            plan = gpu.gemv_plan(x, weight, three, blocks=3)
            assert plan.kernel.blocks == 3
            plan()
            assert torch.equal(three.view(torch.int16), direct.view(torch.int16)), f"{name} k={k} {group} {x_dtype} 3/SM"


@pytest.mark.parametrize("narrow,wide,batches", [("nt2", "nt2w", (9, 17)), ("nt1", "nt1w", (1, 9))])
@pytest.mark.parametrize("name", ["e2m2", "e2m1", "e2m2s4", "e3m2", "e2m3", "e4m3"])
def test_gemv_wide_tiles(cp, rng, name, narrow, wide, batches):
    """Batch 9..16 (1..8) with two 16-row tiles per warp (nt2w, chosen by gpu.gemv_wide for large
    layers; nt1w) on small random shapes: against float64 (gemv_check's bound) and, bit for bit, against nt2 (nt1) with
    the same K split (the same products in the same order). Row counts that end inside the second
    tile, K tails, unaligned x rows, scale groups aligned and not, fp16 and bf16 x."""
    import torch

    fmt = get_format(name)
    for group in (None, 128, 100):
        for x_dtype in ("F16", "BF16"):
            batch = int(rng.integers(*batches))
            n = int(rng.choice([int(rng.integers(1, 40)), 32 * int(rng.integers(1, 20)) + int(rng.integers(0, 32))]))
            k = int(rng.choice([int(rng.integers(1, 700)), 4096, 1000 + 8 * int(rng.integers(0, 200))]))
            _, _, weight, x, _, x64 = gemv_check(cp, rng, fmt, n, k, batch, x_dtype, group=group)
            ref = x64 @ cp.asnumpy(weight.dequantize("F32")).astype(np.float64).reshape(-1, k).T
            outs = {}
            for kind in (narrow, wide):
                for split in (1, 8):
                    y = torch.full((batch, n), float("nan"), dtype=x.dtype, device="cuda")
                    plan = gpu.gemv_plan(x, weight, y, kind=kind, split=split)
                    assert plan.kernel.kind == kind
                    plan()
                    outs[kind, split] = y
                    y64 = y.double().cpu().numpy()
                    assert np.isfinite(y64).all(), f"{name} {kind} split {split}: unwritten outputs"
                    err = np.linalg.norm(y64 - ref) / max(np.linalg.norm(ref), 1e-30)
                    tol = TOL["BF16"] if plan.kernel.mode >= 2 else TOL["F16"]
                    assert err <= tol, f"{name} {n}x{k} B={batch} {kind} split {split}: rel error {err:.2e}"
            for split in (1, 8):
                assert torch.equal(outs[narrow, split].view(torch.int16), outs[wide, split].view(torch.int16)), \
                    f"{name} {n}x{k} B={batch} {x_dtype} group {group} split {split}: {wide} differs from {narrow}"


def poisoned_plan(x, weight, what: str, **tuning):
    """(plan, y): a gemv_plan(**tuning) launched once into a NaN-poisoned y, every output checked written."""
    import torch

    y = torch.full((x.shape[0], weight.n), float("nan"), dtype=x.dtype, device="cuda")
    plan = gpu.gemv_plan(x, weight, y, **tuning)
    plan()
    torch.cuda.synchronize()
    assert torch.isfinite(y.float()).all(), f"{what} {plan.kernel.name}: unwritten outputs"
    return plan, y


def x_tiles_reference(x: np.ndarray, fmt: ExMy) -> np.ndarray:
    """The x tiles of docs/kernels.md as uint16 words, from the definition: per 128 elements of K and 8
    rows of the batch (padded to 8 or 16 with zeros, K to 128) a block of 1024 halves; lane 4g + t's
    16 pair words of chunk 4i + t, batch row 8j + g, as four 16-byte words 512 bytes apart; pair p
    = elements pair_elem(p, 0), pair_elem(p, 1) of the chunk (the 4-bit-only formats pair elements
    differently from the others)."""
    batch, k = x.shape
    rows, kp = 8 if batch <= 8 else 16, -(-k // 128) * 128
    xp = np.zeros((rows, kp), dtype=np.uint16)
    xp[:batch, :k] = x
    nib = fmt.own_bits == 4

    def pair_elem(p, half):
        return 8 * (p >> 2) + 4 * (p & 1) + 2 * half + ((p >> 1) & 1) if nib else (p >> 1) + 16 * (p & 1) + 8 * half

    out = np.zeros(rows * kp, dtype=np.uint16)
    for q in range(kp // 32):
        for b in range(rows):
            for p in range(16):
                word = ((q // 4) * (rows // 8) + b // 8) * 512 + ((b % 8) * 4 + q % 4) * 4 + (p // 4) * 128 + p % 4
                out[2 * word] = xp[b, 32 * q + pair_elem(p, 0)]
                out[2 * word + 1] = xp[b, 32 * q + pair_elem(p, 1)]
    return out


@pytest.mark.parametrize("name", ["e2m2", "e2m1", "e2m2s4", "e3m2", "e4m3", "e5m2"])
def test_gemv_x_tiles(cp, rng, name):
    """The batch 9..16 kinds read x as x tiles (gpu.gemv_tiled: fp16 operands always, bf16 operands from
    2^24 weights), written just before by exmy_x_tiles in the operand type: its words equal the layout's
    definition (x_tiles_reference; fp16 x for bf16 operands rounded to bf16, gpu.x_tiles_conv) in a
    workspace poisoned with 0xFF, and the GEMV gives the bits of the same kernel reading x from its rows
    (the same x values meet the same weights in the same order), through gemv_plan (plain and PDL
    launches) and a GemvLaunch. Every kind of the batch, the host's split and splits 1 and 8, fp16 and
    bf16 x (modes 0 to 3: e5m2 takes bf16 operands for fp16 x; mode 5 reads no rows), random batches,
    row counts that end inside a tile, K tails and unaligned x rows, scale groups aligned and not."""
    import torch

    fmt = get_format(name)
    overlap = torch.cuda.get_device_capability() >= (9, 0)
    for group in (None, 128, 100):
        for x_dtype in ("F16", "BF16"):
            batch = int(rng.integers(9, 17))
            n = int(rng.choice([int(rng.integers(1, 40)), 32 * int(rng.integers(1, 40)) + int(rng.integers(0, 32))]))
            k = int(rng.choice([int(rng.integers(1, 700)), 4096, 1000 + 8 * int(rng.integers(0, 400)), 2001, 20000]))
            _, _, weight, x, _, _ = gemv_check(cp, rng, fmt, n, k, batch, x_dtype, group=group)
            host = gpu.gemv_kernel(weight, x_dtype, batch)
            assert host.tiled == (host.mode in (0, 1, 5) or n * k >= 1 << 24), host
            if host.mode == 5:
                continue  # (bf16 x on a large layer: no rows to compare with)
            for kind in ("nt2", "nt2w"):
                what = f"{name} {n}x{k} B={batch} group {group} x {x_dtype} {kind}"
                for split in (None, 1, 8):
                    outs = []
                    for tiled, pdl in ((False, False), (True, False), (True, overlap)):
                        plan, y = poisoned_plan(x, weight, f"{what} split {split}", kind=kind, split=split,
                                                tiled=tiled, overlap=pdl)
                        assert plan.kernel.tiled == tiled and (plan.tiles is not None) == tiled
                        if tiled and split is None and not pdl:  # the tiles alone, against the definition
                            fn, grid, block, (xc, work, *rest) = plan.tiles
                            assert grid == gpu.x_tiles_grid(batch, k, gpu.x_tiles_conv(plan.kernel)), grid
                            work.fill(0xFF)
                            fn(grid, block, (xc, work, *rest))
                            got = cp.asnumpy(work.view(cp.uint16))[: work.size // 2 - (2 * grid[0])]
                            conv = gpu.x_tiles_conv(plan.kernel)
                            assert conv == (1 if plan.kernel.mode == 2 and x_dtype == "F16" else 0), plan.kernel
                            xs = x.float().to(torch.bfloat16) if conv == 1 else x
                            want = x_tiles_reference(xs.view(torch.int16).cpu().numpy().view(np.uint16), fmt)
                            assert np.array_equal(got, want), f"{what}: x tiles differ from their definition"
                        outs.append(y)
                    for y in outs[1:]:
                        assert torch.equal(outs[0].view(torch.int16), y.view(torch.int16)), \
                            f"{what} split {split} ({plan.kernel.name}): x tiles give other bits than x rows"
            launch = gpu.GemvLaunch(weight, x_dtype, batch, overlap=overlap)  # the host's kind, with a workspace
            assert launch.kernel == host and launch.work_bytes == (gpu.x_tiles_bytes(batch, k) if host.tiled else 0), \
                launch.kernel
            work = torch.full((launch.work_bytes,), 0xFF, dtype=torch.uint8, device="cuda")
            y = torch.full((batch, n), float("nan"), dtype=x.dtype, device="cuda")
            launch(x.data_ptr(), y.data_ptr(), torch.cuda.current_stream().cuda_stream, work.data_ptr())
            want = torch.full_like(y, float("nan"))
            gpu.gemv_plan(x, weight, want, tiled=False)()
            torch.cuda.synchronize()
            assert torch.equal(y.view(torch.int16), want.view(torch.int16)), f"{name} {n}x{k} B={batch}: the GemvLaunch differs"


@pytest.mark.parametrize("name", ["e2m2", "e2m1", "e3m2", "e2m2s4"])
def test_gemv_batch_1_host_kind_on_wide_layers(cp, rng, monkeypatch, name):
    """Batch 1 on wide layers past b1's staging (gpu._gemv_kind; here made so on small layers by patching the
    staging limit and gemv_wide) takes nt1w for unshared formats, with bf16 x in mode 5 (x tiles in a poisoned
    workspace), b1r for the shared ones and for routed pairs. Through gemv_plan and a GemvLaunch: every output
    written, within gemv_check's bound of float64, and the two bit for bit equal; fp16 and bf16 x."""
    import torch

    fmt = get_format(name)
    monkeypatch.setattr(gpu, "XS_LIMIT", 0)
    monkeypatch.setattr(gpu, "gemv_wide", lambda n, fmt: fmt.bits <= 6)
    want = "nt1w" if fmt.share == 1 else "b1r"
    for x_dtype in ("F16", "BF16"):
        n = 16 * int(rng.integers(1, 40)) + int(rng.integers(0, 16))
        k = int(rng.choice([int(rng.integers(1, 700)), 1000 + 8 * int(rng.integers(0, 400))]))
        _, _, weight, x, _, x64 = gemv_check(cp, rng, fmt, n, k, 1, x_dtype)
        assert gpu.gemv_kernel(weight, x_dtype, 1, routed=True).kind == "b1r"
        what = f"{name} {n}x{k} x {x_dtype}"
        plan, y = poisoned_plan(x, weight, what)
        assert plan.kernel.kind == want, plan.kernel
        if x_dtype == "BF16":  # bf16 x as scaled fp16: converted by exmy_x_tiles (mode 5) or by b1r itself (4)
            assert plan.kernel.mode == (5 if want == "nt1w" else 4), plan.kernel
        ref = x64 @ cp.asnumpy(weight.dequantize("F32")).astype(np.float64).reshape(-1, k).T
        err = np.linalg.norm(y.double().cpu().numpy() - ref) / max(np.linalg.norm(ref), 1e-30)
        assert err <= (TOL["BF16"] if plan.kernel.mode >= 2 else TOL["F16"]), f"{what}: rel error {err:.2e}"
        launch = gpu.GemvLaunch(weight, x_dtype, 1, overlap=torch.cuda.get_device_capability() >= (9, 0))
        assert launch.kernel == plan.kernel, launch.kernel
        work = torch.full((max(launch.work_bytes, 16),), 0xFF, dtype=torch.uint8, device="cuda")
        got = torch.full_like(y, float("nan"))
        launch(x.data_ptr(), got.data_ptr(), torch.cuda.current_stream().cuda_stream, work.data_ptr())
        torch.cuda.synchronize()
        assert torch.equal(got.view(torch.int16), y.view(torch.int16)), f"{what}: the GemvLaunch differs"


@pytest.mark.parametrize("define,kind,batches", [
    ("GEMV_PP=1", None, (1, 2)), ("GEMV_PP=-1", "nt1", (2, 9)), ("GEMV_PP=-1", "nt2", (9, 17)),
    ("GEMV_PP=1", "nt1w", (2, 9)), ("GEMV_PP=-1", "nt2w", (9, 17)),
])
@pytest.mark.parametrize("name", ["e2m2", "e2m1"])
def test_gemv_option_build_equals_default(cp, rng, name, define, kind, batches):
    """Build options that only move data differently give the default build's bits: GEMV_PP=1 / -1
    (two alternating register sets for the prefetched weights, or one; kind None: the host's batch-1
    kind, b1 or b1r by K). The same x values meet the same weights in the same order (both pairings of x: e2m2's
    and the 4-bit-plane formats'). Row counts and batches that end inside a tile, K tails and unaligned x rows (the tail
    path), scale groups, fp16 and bf16 x (mode 4 or 5 where the host takes them), the host's split and
    splits 1, 2 and 8 (8 also with contiguous slices), plain launches and PDL."""
    import torch

    fmt = get_format(name)
    for group in (None, 128):
        for x_dtype in ("F16", "BF16"):
            batch = int(rng.integers(*batches))
            n = int(rng.choice([int(rng.integers(1, 40)), 32 * int(rng.integers(1, 40)) + int(rng.integers(0, 32))]))
            k = int(rng.choice([int(rng.integers(1, 700)), 4096, 1000 + 8 * int(rng.integers(0, 400)), 2001, 20000]))
            _, _, weight, x, _, _ = gemv_check(cp, rng, fmt, n, k, batch, x_dtype, group=group)
            for split, interleave in ((None, None), (1, None), (2, None), (8, None), (8, 0)):
                outs = []
                for defines, overlap in (((), False), ((define,), False), ((define,), True)):
                    plan, y = poisoned_plan(x, weight, f"{name} {kind} {defines}", kind=kind, defines=defines,
                                            overlap=overlap, split=split, interleave=interleave)
                    outs.append(y)
                for y in outs[1:]:
                    assert torch.equal(outs[0].view(torch.int16), y.view(torch.int16)), \
                        f"{name} {n}x{k} B={batch} {x_dtype} group {group} {plan.kernel.name} split {split}: {define} differs"


def tileable_cases(rng, batches):
    """(scale group, x dtype, batch, n, k) for the tile-order tests: one scale per row and groups of 128,
    fp16 and bf16 x; N whole 16-row tiles; K whole 128-element blocks below, at and above b1's limit,
    or 8 short of them (a K tail inside the last chunk, padded K still whole blocks)."""
    for group in (None, 128):
        for x_dtype in ("F16", "BF16"):
            n = 16 * int(rng.integers(1, 80))
            k = 128 * int(rng.choice([int(rng.integers(1, 40)), 4096 // 128, 20096 // 128])) - 8 * int(rng.integers(0, 2))
            yield group, x_dtype, int(rng.integers(*batches)), n, k


@pytest.mark.parametrize("kind,batches", [(None, (1, 2)), ("nt1w", (2, 9)), ("nt2w", (9, 17))])
@pytest.mark.parametrize("name", ["e2m2", "e3m2", "e2m1"])
def test_gemv_l2_prefetch_builds_equal_default(cp, rng, name, kind, batches):
    """GEMV_L2PF=2 (bulk L2 prefetches of the weights in tile order, two iterations ahead) and GEMV_WARM (the
    kinds with x tiles put their first iterations into L2 first thing: never with 0, two with 2) only warm L2:
    the default build's bits, for b1 and b1r (K below and above b1's), the two-tile kinds, K tails, scale
    groups, fp16 and bf16 x, the host's split and splits 1 and 8 (also contiguous), plain launches and PDL."""
    fmt = get_format(name)
    for group, x_dtype, batch, n, k in tileable_cases(rng, batches):
        _, _, weight, x, _, _ = gemv_check(cp, rng, fmt, n, k, batch, x_dtype, group=group, order="tile")
        assert weight.order == "tile"
        for split, interleave in ((None, None), (1, None), (8, None), (8, 0)):
            _, y_ref = poisoned_plan(x, weight, f"{name} {kind}", kind=kind, split=split, interleave=interleave)
            for define, overlap in (("GEMV_L2PF=2", False), ("GEMV_L2PF=2", True), ("GEMV_WARM=0", True),
                                    ("GEMV_WARM=2", True)):
                plan, y = poisoned_plan(x, weight, f"{name} {kind} {define}", kind=kind, split=split,
                                        interleave=interleave, overlap=overlap, defines=(define,))
                assert torch_equal_bits(y_ref, y), \
                    f"{name} {n}x{k} B={batch} {x_dtype} group {group} {plan.kernel.name} split {split}: {define} differs"


@pytest.mark.parametrize("kind,batches", [(None, (1, 2)), ("nt1", (2, 9)), ("nt1w", (2, 9)), ("nt2", (9, 17)),
                                          ("nt2w", (9, 17))])
@pytest.mark.parametrize("name", ["e2m2", "e3m2", "e2m1", "e4m3"])
def test_gemv_tile_order_equals_row_order(cp, rng, name, kind, batches):
    """The GEMV on the weights in tile order (gpu.tile_order; its EXMY_TILE build) gives the bits of the
    same weights in row order, but for b1r without a 2- or 8-bit plane (e2m1, e2m2), whose row order
    takes a lane's chunks spread (gemv.cu Cfg::SPREAD) and so sums in another order (e2m2: the last bit
    of 0-3 of 48-1024 outputs on K = 20096): there both are held to the float64 reference within the
    GEMV's tolerance. Cases: every plane combination (4+1, 4+2, 4, 8 bits), batch 1 in b1 and b1r
    (K below and above b1's), the batch 2..16 kinds, K with and without a tail iteration (tileable_cases), scale groups,
    fp16 and bf16 x, the host's split and splits 1, 2, 8 (8 also with contiguous slices), PDL."""
    fmt = get_format(name)
    for group, x_dtype, batch, n, k in tileable_cases(rng, batches):
        _, _, weight, x, _, x64 = gemv_check(cp, rng, fmt, n, k, batch, x_dtype, group=group, order="row")
        tiled = gpu.tile_order(weight)
        ref64 = x64 @ cp.asnumpy(weight.dequantize("F32")).astype(np.float64).T
        assert k <= 128 or not cp.array_equal(tiled.payload, weight.payload)  # (one block per row: e2m1's orders agree)
        for split, interleave in ((None, None), (1, None), (2, None), (8, None), (8, 0)):
            ref, y_ref = poisoned_plan(x, weight, f"{name} {kind}", kind=kind, split=split, interleave=interleave)
            for overlap in (False, True):
                plan, y = poisoned_plan(x, tiled, f"{name} {kind} tile order", kind=kind, split=split,
                                        interleave=interleave, overlap=overlap)
                assert plan.kernel == replace(ref.kernel, order="tile") and plan.split == ref.split
                what = f"{name} {n}x{k} B={batch} {x_dtype} group {group} {plan.kernel.name} split {split}"
                if plan.kernel.kind == "b1r" and not {2, 8} & set(fmt.planes):  # (Cfg::SPREAD in row order)
                    for out in (y_ref, y):
                        y64 = out.double().cpu().numpy()
                        err = np.linalg.norm(y64 - ref64) / max(np.linalg.norm(ref64), 1e-30)
                        assert err <= TOL["BF16" if plan.kernel.mode >= 2 else "F16"], f"{what}: rel error {err:.2e}"
                else:
                    assert torch_equal_bits(y_ref, y), f"{what}: tile order differs"


@pytest.mark.parametrize("name", ["e2m2", "e3m2", "e2m1", "e4m3", "e3m3", "e1m1"])
def test_dequant_tile_order_equals_row_order(cp, rng, name):
    """Dequantization of a weight in tile order (its EXMY_TILE build, which numbers its units block by
    block) gives the bits of the same weight in row order (which other tests hold to the CPU reference),
    into every element of a poisoned output: every plane combination, every output dtype, scale groups
    aligned to chunks and not, K whole blocks or ending inside the last chunk."""
    fmt = get_format(name)
    for group, tail in ((None, 0), (64, 0), (None, int(rng.integers(1, 32))), (100, int(rng.integers(1, 32)))):
        n, k = 16 * int(rng.integers(1, 60)), 128 * int(rng.integers(1, 40)) - tail
        qt = quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), fmt, group)
        weight = gpu.upload(qt, order="row")
        tiled = gpu.tile_order(weight)
        for out_dtype in ("F16", "BF16", "F32"):
            ref = cp.asnumpy(weight.dequantize(out_dtype))
            out = cp.empty((n, k), dtype={"F16": cp.float16, "BF16": cp.uint16, "F32": cp.float32}[out_dtype])
            out.view(cp.uint8).fill(0xFF)  # NaN in every output dtype
            got = cp.asnumpy(tiled.dequantize(out_dtype, out=out))
            what = f"{name} {n}x{k} g{group} {out_dtype}"
            nan = (got & 0x7FFF) > 0x7F80 if out_dtype == "BF16" else np.isnan(got)  # the poison is NaN
            assert not nan.any(), f"{what}: NaN (an element not written?)"
            assert np.array_equal(ref.view(np.uint8), got.view(np.uint8)), what


def torch_equal_bits(a, b) -> bool:
    import torch

    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("group", [32, 64, 128, 96, 100])
def test_gemv_group_sizes(cp, rng, group):
    for name in ("e2m2", "e3m2", "e4m3"):
        for batch in (1, 10):
            gemv_check(cp, rng, get_format(name), 150, 1100, batch, "F16", group=group)
            gemv_check(cp, rng, get_format(name), 150, 1100, batch, "BF16", group=group)


def test_gemv_scale_modes(cp, rng):
    """Large fp16 scales (fold would overflow: two-step path), bf16 scales with fp16 x, E = 5."""
    k, n = 640, 96
    # large fp16 scales: |w| up to ~1e3 -> scale*2^14 > 65504
    qt = quantize((rng.standard_normal((n, k)) * 300).astype(np.float32), get_format("e2m2"))
    assert qt.scale_dtype == "F16"
    _, kernel, *_ = gemv_check(cp, rng, get_format("e2m2"), n, k, 3, "F16", qt=qt)
    assert kernel.mode == 1, kernel
    # bf16 scales (values beyond fp16 range): bf16 operands; with bf16 x one scale per row goes on the
    # sums (mode 3: a small layer); with fp16 x (output fp16) or scale groups the scale goes on each weight (mode 2)
    qt = quantize((rng.standard_normal((n, k)) * 1e-6).astype(np.float32), get_format("e3m2"))
    assert qt.scale_dtype == "BF16"
    _, kernel, *_ = gemv_check(cp, rng, get_format("e3m2"), n, k, 5, "BF16", qt=qt)
    assert (kernel.mode, kernel.x_dtype) == (3, "BF16"), kernel
    _, kernel, *_ = gemv_check(cp, rng, get_format("e3m2"), n, k, 5, "F16", qt=qt, x_scale=300.0)
    assert (kernel.mode, kernel.x_dtype) == (2, "F16"), kernel
    qt = quantize((rng.standard_normal((n, k)) * 1e-6).astype(np.float32), get_format("e3m2"), 128)
    _, kernel, *_ = gemv_check(cp, rng, get_format("e3m2"), n, k, 5, "BF16", qt=qt)
    assert (kernel.mode, kernel.x_dtype, kernel.groups) == (2, "BF16", 1), kernel
    for name in ("e5m2", "e5m0"):
        _, kernel, *_ = gemv_check(cp, rng, get_format(name), n, k, 2, "F16", scale=1e-3)
        assert (kernel.mode, kernel.x_dtype) == (2, "F16"), kernel


def test_gemv_large_batch_and_vector(cp, rng):
    """More than 16 rows of x (several launches), a 1-D x, and batch 1 with K too large to stage
    x in shared memory (b1r kernels instead of b1)."""
    import torch

    fmt = get_format("e2m2")
    gemv_check(cp, rng, fmt, 200, 1024, 37, "F16")
    for x_dtype in ("F16", "BF16"):
        _, kernel, *_ = gemv_check(cp, rng, fmt, 40, 45000, 1, x_dtype)
        assert kernel.kind == "b1r", kernel
        _, kernel, *_ = gemv_check(cp, rng, fmt, 40, 4000, 1, x_dtype)
        assert kernel.kind == "b1", kernel
    qt = quantize((rng.standard_normal((64, 256)) * 0.1).astype(np.float32), fmt)
    w = gpu.upload(qt)
    x = torch.randn(256, dtype=torch.float16, device="cuda")
    y = gpu.gemv(x, w)
    assert tuple(y.shape) == (64,)
    ref = x.double().cpu().numpy() @ qt.dequantize("F32").astype(np.float64).T
    assert np.linalg.norm(y.double().cpu().numpy() - ref) <= 2e-3 * np.linalg.norm(ref)
