"""Scales, quantization and dequantization (SPEC section 2) against an oracle written from the spec:
s = fl32(amax / max) rounded to the scale dtype (numpy fp16 / ml_dtypes bf16), clamped to the
dtype's smallest normal; code = nearest(fl32(w / s)) by brute force; w' = table[code] * s exactly."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from conftest import brute_force_encode, spec_table, spec_unpack
from exmyconv.format import exmy as formats
from exmyconv.format import quant

ALL = formats.all_formats()
NAMED = [formats.get_format(n) for n in formats.NAMED]
SMALLEST_NORMAL = {"F16": 2.0**-14, "BF16": 2.0**-126}


def round_to(x32: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F16":
        return x32.astype(np.float16).astype(np.float32)
    return x32.astype(ml_dtypes.bfloat16).astype(np.float32)


def oracle_groups(k, group_size):
    g = k if group_size is None or group_size >= k else group_size
    return g, -(-k // g)


def oracle_amax(x2: np.ndarray, g: int) -> np.ndarray:
    k = x2.shape[1]
    return np.stack([np.abs(x2[:, j:j + g]).max(axis=1) for j in range(0, k, g)], axis=1).astype(np.float32)


def oracle_scales(x: np.ndarray, fmt, group_size=None):
    """(G, scale dtype, scales [R, ngroups] float32) exactly as SPEC section 2 describes."""
    x2 = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    g, _ = oracle_groups(x2.shape[1], group_size)
    amax = oracle_amax(x2, g)
    s32 = amax / np.float32(fmt.max)  # fl32(amax / max)
    with np.errstate(over="ignore"):
        s16 = s32.astype(np.float16).astype(np.float64)
    nz = amax > 0
    fits = np.all(np.isfinite(s16[nz]) & (s16[nz] >= 2.0**-14) & (s16[nz] * fmt.max <= 65504.0))
    dtype = "F16" if fits else "BF16"
    s = round_to(s32, dtype)
    # SPEC: rounded down instead where s * max would exceed the float32 range
    over = s.astype(np.float64) * fmt.max > np.finfo(np.float32).max
    if over.any():
        assert dtype == "BF16"
        down = s32[over].astype(ml_dtypes.bfloat16)
        down = np.where(down.astype(np.float32) > s32[over], np.nextafter(down, ml_dtypes.bfloat16(0)), down)
        s[over] = down.astype(np.float32)
    s = np.maximum(s, np.float32(SMALLEST_NORMAL[dtype]))
    return g, dtype, s


def oracle_codes(x: np.ndarray, fmt, g: int, scales: np.ndarray) -> np.ndarray:
    x2 = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    expanded = np.repeat(scales, g, axis=1)[:, :x2.shape[1]].astype(np.float32)
    y = x2 / expanded  # fl32(w / s)
    return brute_force_encode(y, fmt.e, fmt.m)


def codes_of(q: quant.QTensor) -> np.ndarray:
    k = q.shape[-1]
    return spec_unpack(q.payload, q.fmt.bits, k)[..., :k]


def exact_dequant(q: quant.QTensor) -> np.ndarray:
    """float64 table[code] * scale, via the spec-only decoder."""
    codes = codes_of(q).reshape(-1, q.shape[-1])
    table = spec_table(q.fmt.e, q.fmt.m)
    scales = np.repeat(q.scales.reshape(codes.shape[0], -1).astype(np.float64), q.group_size, axis=1)
    return (table[codes] * scales[:, :codes.shape[1]]).reshape(q.shape)


def check_against_oracle(x, fmt, group_size=None):
    q = quant.quantize(x, fmt, group_size)
    *lead, k = x.shape
    g, dtype, s = oracle_scales(x, fmt, group_size)
    ngroups = -(-k // g)
    assert q.group_size == g and q.shape == x.shape and q.scale_dtype == dtype
    assert q.scales.shape == (*lead, ngroups) and q.payload.shape == (*lead, 32 * -(-k // 32) * fmt.bits // 8)
    assert q.scales.dtype == np.float32
    assert np.array_equal(q.scales.reshape(-1, ngroups), s), "scales differ from SPEC's rule"
    codes = codes_of(q).reshape(-1, k)
    want = oracle_codes(x, fmt, g, s)
    assert np.array_equal(codes, want), np.argwhere(codes != want)[:5]
    return q


# --------------------------------------------------------------------------- scales and codes

@pytest.mark.parametrize("fmt", ALL, ids=[f.name for f in ALL])
def test_per_channel_matches_spec_oracle(fmt, rng):
    x = (rng.standard_normal((13, 200)) * rng.uniform(0.001, 10, (13, 1))).astype(np.float32)
    x[3, 7] = 40 * np.abs(x[3]).max()  # an outlier
    q = check_against_oracle(x, fmt)
    assert q.scales.shape == (13, 1)


@pytest.mark.parametrize("group_size", [1, 7, 32, 50, 64, 100, 128, 199, 200, 201, 4096])
def test_group_scales_dividing_and_not(group_size, rng):
    fmt = formats.get_format("e2m2")
    x = rng.standard_normal((6, 200)).astype(np.float32) * np.float32(0.02)
    x[:, -1] = 5.0  # the last element drives the short last group's scale only
    q = check_against_oracle(x, fmt, group_size)
    g = min(group_size, 200)
    assert q.group_size == g and q.scales.shape == (6, -(-200 // g))
    if 200 % g:  # short last group: its own amax (5.0), the others don't see it
        assert np.all(q.scales[:, -1] == round_to(np.float32(5.0) / np.float32(7.0), q.scale_dtype))


@pytest.mark.parametrize("fmt", NAMED, ids=[f.name for f in NAMED])
@pytest.mark.parametrize("group_size", [None, 16, 48, 130])
def test_3d_and_random_groups_match_oracle(fmt, group_size, rng):
    x = (rng.standard_t(3, (2, 5, 130)) * 0.05).astype(np.float32)
    q = check_against_oracle(x, fmt, group_size)
    assert q.payload.shape[:2] == (2, 5)


def test_group_size_at_least_k_is_per_channel(rng):
    fmt = formats.get_format("e3m2")
    x = rng.standard_normal((4, 77)).astype(np.float32)
    ref = quant.quantize(x, fmt)
    for g in (77, 78, 1000):
        q = quant.quantize(x, fmt, g)
        assert q.group_size == 77 and q.scales.shape == (4, 1)
        assert np.array_equal(q.payload, ref.payload) and np.array_equal(q.scales, ref.scales)
    assert quant.groups_of(77, None) == (77, 1) and quant.groups_of(77, 10) == (10, 8)
    assert quant.groups_of(128, 32) == (32, 4) and quant.groups_of(5, 5) == (5, 1)


def test_quantize_needs_two_dimensions():
    with pytest.raises(ValueError):
        quant.quantize(np.ones(5, np.float32), formats.get_format("e2m2"))


# --------------------------------------------------------------------------- scale dtype

E2M2 = formats.get_format("e2m2")  # max 7


@pytest.mark.parametrize("amax,want", [
    (1.0, "F16"),
    (57344.0, "F16"),  # s = 8192, s*7 = 57344 <= 65504
    (65520.0, "BF16"),  # s = 9360 (an fp16 number), s*7 = 65520 > 65504
    (65504.0, "BF16"),  # s = 9357.71.. rounds to 9360 in fp16 -> 65520 > 65504
    (1e6, "BF16"),  # s > 65504 / max
    (7 * 2.0**-14, "F16"),  # s = 2^-14: the smallest fp16 normal
    (7 * (2.0**-14 - 2.0**-24), "BF16"),  # s = the largest fp16 subnormal
    (1e-5, "BF16"),  # tiny row
])
def test_scale_dtype_rule_hand_cases(amax, want, rng):
    x = (rng.uniform(-1, 1, (4, 64)) * 0.5).astype(np.float32)
    x[2] = 0
    x[2, 5] = np.float32(amax)  # row 2 has this amax, the others amax <= 0.5
    x[2, 9] = -np.float32(amax) * np.float32(0.25)
    q = quant.quantize(x, E2M2)
    assert q.scale_dtype == want
    s = q.scales[2, 0]
    assert s == np.maximum(round_to(np.float32(amax) / np.float32(7), want), SMALLEST_NORMAL[want])
    assert np.isfinite(q.dequantize()).all()
    if want == "F16":  # fp16 dequantization can never overflow
        assert np.all(q.scales.astype(np.float64) * 7 <= 65504)
        assert np.isfinite(q.dequantize("F16")).all()


@pytest.mark.parametrize("fmt", NAMED, ids=[f.name for f in NAMED])
def test_scale_dtype_huge_and_tiny_rows(fmt, rng):
    base = rng.standard_normal((5, 96)).astype(np.float32)
    normal = check_against_oracle(base, fmt)
    assert normal.scale_dtype == "F16"
    huge = base.copy()
    huge[1] *= np.float32(2 * 65504 / np.abs(huge[1]).max())  # s = amax/max > 65504/max
    q = check_against_oracle(huge, fmt)
    assert q.scale_dtype == "BF16"
    tiny = base.copy()
    tiny[3] *= np.float32(1e-7)
    q = check_against_oracle(tiny, fmt)
    assert q.scale_dtype == "BF16" and q.scales[3, 0] >= 2.0**-126


@pytest.mark.parametrize("fmt", NAMED, ids=[f.name for f in NAMED])
@pytest.mark.parametrize("group_size", [None, 16])
def test_zero_and_tiny_rows_never_give_bad_scales(fmt, group_size, rng):
    x = rng.standard_normal((6, 64)).astype(np.float32)
    x[0] = 0.0
    x[1] = -0.0
    x[2] = np.float32(1e-45) * rng.integers(-3, 4, 64)  # float32 subnormals
    x[3, :16] = 0.0  # one zero group inside a normal row
    x[4] *= np.float32(1e-30)
    q = check_against_oracle(x, fmt, group_size)
    s = q.scales
    assert np.isfinite(s).all() and (s >= SMALLEST_NORMAL[q.scale_dtype]).all()
    assert q.scale_dtype == "BF16"  # the tiny rows force bf16
    d = q.dequantize()
    assert np.isfinite(d).all() and not np.isnan(d).any()
    assert np.all(d[0] == 0) and np.all(d[1] == 0) and np.all(np.signbit(d[1]))
    # all-zero tensor: scales are fp16's smallest normal, every value decodes to 0
    z = quant.quantize(np.zeros((3, 40), np.float32), fmt, group_size)
    assert z.scale_dtype == "F16" and np.all(z.scales == 2.0**-14) and not z.dequantize().any()
    # a zero row next to normal rows keeps fp16 and gets its smallest normal
    y = rng.standard_normal((3, 64)).astype(np.float32)
    y[1] = 0
    q = check_against_oracle(y, fmt, group_size)
    assert q.scale_dtype == "F16" and np.all(q.scales[1] == 2.0**-14)


def test_extreme_but_finite_weights_dequantize_to_finite_values():
    """SPEC 2: 'the product ... always fits in float32'. A finite weight near the float32 limit
    must not come back as inf (a bf16 scale rounded *up* past FLT_MAX / max is rounded down)."""
    bad = []
    for fmt in ALL:
        x = np.array([[3.0e38, -1.0e38, 1.0, 0.0], [-3.4028235e38, 2.0, 0.5, 1e30]], np.float32)
        d = check_against_oracle(x, fmt).dequantize()
        if not np.isfinite(d).all():
            bad.append((fmt.name, d[~np.isfinite(d)].tolist()))
    assert not bad, f"finite weights dequantized to inf: {bad}"


# --------------------------------------------------------------------------- reconstruction error

@pytest.mark.parametrize("fmt", ALL, ids=[f.name for f in ALL])
@pytest.mark.parametrize("group_size", [None, 32, 100])
def test_error_at_most_half_a_grid_step(fmt, group_size, rng):
    x = (rng.standard_t(4, (8, 300)) * rng.uniform(1e-3, 1, (8, 1))).astype(np.float32)
    q = quant.quantize(x, fmt, group_size)
    d = q.dequantize().astype(np.float64)
    assert np.isfinite(d).all()
    g = q.group_size
    s = np.repeat(q.scales.astype(np.float64), g, axis=1)[:, :300]
    a = np.abs(x.astype(np.float64)) / s  # exact |w| / s
    pos = spec_table(fmt.e, fmt.m)[: 2 ** (fmt.e + fmt.m)]
    hi_idx = np.clip(np.searchsorted(pos, a), 1, pos.size - 1)
    half_gap = (pos[hi_idx] - pos[hi_idx - 1]) / 2
    beyond = np.maximum(a - fmt.max, 0)  # saturation (scale rounded down)
    bound = np.where(a > fmt.max, beyond, half_gap) * s + np.abs(x) * 2.0**-22  # + fl32(w/s) slack
    err = np.abs(d - x)
    assert np.all(err <= bound), np.max(err / bound)
    # the scale's rounding is the only source of saturation: |w|/s <= max (1 + 2^-8)
    assert np.all(a <= fmt.max * (1 + 2.0**-8))


@pytest.mark.parametrize("fmt", NAMED, ids=[f.name for f in NAMED])
@pytest.mark.parametrize("group_size", [None, 32])
def test_clip_search_never_worse_per_group(fmt, group_size, rng):
    x = (rng.standard_t(2, (16, 256)) * 0.02).astype(np.float32)
    plain = quant.quantize(x, fmt, group_size)
    clip = quant.quantize(x, fmt, group_size, clip_search=True)
    g = plain.group_size
    assert clip.scale_dtype == plain.scale_dtype and clip.group_size == g
    assert np.all(clip.scales <= plain.scales) and np.all(clip.scales >= SMALLEST_NORMAL[clip.scale_dtype])
    x64 = x.astype(np.float64)
    e_plain = (plain.dequantize().astype(np.float64) - x64) ** 2
    e_clip = (clip.dequantize().astype(np.float64) - x64) ** 2
    ng = -(-256 // g)
    per_plain = np.stack([e_plain[:, j * g:(j + 1) * g].sum(1) for j in range(ng)], 1)
    per_clip = np.stack([e_clip[:, j * g:(j + 1) * g].sum(1) for j in range(ng)], 1)
    worse = per_clip > per_plain * (1 + 1e-6)
    assert not worse.any(), (per_clip[worse], per_plain[worse])
    if fmt.bits <= 5:  # coarse grids on heavy tails: clipping must help somewhere
        assert per_clip.sum() < per_plain.sum()
    # codes are still the nearest values under the chosen scales
    codes = codes_of(clip).reshape(-1, 256)
    assert np.array_equal(codes, oracle_codes(x, fmt, g, clip.scales.reshape(16, -1)))


# --------------------------------------------------------------------------- dequantization

@pytest.mark.parametrize("fmt", ALL, ids=[f.name for f in ALL])
def test_dequantize_is_exact_table_times_scale(fmt, rng):
    x = (rng.standard_normal((3, 4, 150)) * rng.uniform(1e-4, 1e3, (3, 4, 1))).astype(np.float32)
    for group_size in (None, 64):
        q = quant.quantize(x, fmt, group_size)
        exact = exact_dequant(q)
        d32 = q.dequantize()  # default F32
        assert d32.dtype == np.float32 and d32.shape == x.shape
        assert np.array_equal(d32.astype(np.float64), exact), "float32 output must be exact"
        assert np.array_equal(q.dequantize("F32"), d32)
        assert np.isfinite(d32).all()
        f16 = q.dequantize("F16")
        with np.errstate(over="ignore"):
            assert np.array_equal(f16, exact.astype(np.float32).astype(np.float16).astype(np.float32),
                                  equal_nan=False)
        bf16 = q.dequantize("BF16")
        assert np.array_equal(bf16, exact.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32))


def test_scales_are_exact_in_their_dtype(rng):
    for fmt in NAMED:
        for scale in (1.0, 1e6, 1e-7):
            x = (rng.standard_normal((7, 90)) * scale).astype(np.float32)
            q = quant.quantize(x, fmt, 30)
            assert np.array_equal(round_to(q.scales, q.scale_dtype), q.scales)
            assert np.all(q.scales >= SMALLEST_NORMAL[q.scale_dtype]) and np.isfinite(q.scales).all()
