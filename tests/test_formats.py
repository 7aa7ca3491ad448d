"""ExMy formats (SPEC section 1): value tables and the encoder's rounding, against independent
oracles (ml_dtypes, literal hand-computed tables, the spec formula, brute-force nearest value)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from conftest import brute_force_encode, spec_table, spec_value
from exmyconv.format import exmy as formats
from exmyconv.errors import ExmyError

ALL = formats.all_formats()
ALL_IDS = [f.name for f in ALL]

# ExMy formats that agree code for code with an ml_dtypes type (SPEC section 1).
ML_EXACT = {"e2m1": ml_dtypes.float4_e2m1fn, "e2m3": ml_dtypes.float6_e2m3fn, "e3m2": ml_dtypes.float6_e3m2fn}

# Hand-computed positive halves (codes 0 .. 2^(E+M)-1), written out literally.
E2M2_POS = [0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7]
E3M1_POS = [0, 0.125,  # subnormal: m * 2^-3
            0.25, 0.375, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24]
E4M3_POS = [
    0, 0.001953125, 0.00390625, 0.005859375, 0.0078125, 0.009765625, 0.01171875, 0.013671875,  # exponent field 0
    0.015625, 0.017578125, 0.01953125, 0.021484375, 0.0234375, 0.025390625, 0.02734375, 0.029296875,  # 1
    0.03125, 0.03515625, 0.0390625, 0.04296875, 0.046875, 0.05078125, 0.0546875, 0.05859375,  # 2
    0.0625, 0.0703125, 0.078125, 0.0859375, 0.09375, 0.1015625, 0.109375, 0.1171875,  # 3
    0.125, 0.140625, 0.15625, 0.171875, 0.1875, 0.203125, 0.21875, 0.234375,  # 4
    0.25, 0.28125, 0.3125, 0.34375, 0.375, 0.40625, 0.4375, 0.46875,  # 5
    0.5, 0.5625, 0.625, 0.6875, 0.75, 0.8125, 0.875, 0.9375,  # 6
    1, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875,  # 7
    2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75,  # 8
    4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5,  # 9
    8, 9, 10, 11, 12, 13, 14, 15,  # 10
    16, 18, 20, 22, 24, 26, 28, 30,  # 11
    32, 36, 40, 44, 48, 52, 56, 60,  # 12
    64, 72, 80, 88, 96, 104, 112, 120,  # 13
    128, 144, 160, 176, 192, 208, 224, 240,  # 14
    256, 288, 320, 352, 384, 416, 448, 480,  # 15: an ordinary binade, no NaN
]
HAND = {"e2m2": E2M2_POS, "e3m1": E3M1_POS, "e4m3": E4M3_POS}

# SPEC section 1's table of named formats, literally.
SPEC_NAMED = {  # name: (bits, bias, max, smallest subnormal)
    "e2m1": (4, 1, 6, 0.5), "e2m2": (5, 1, 7, 0.25), "e3m1": (5, 3, 24, 0.125),
    "e2m3": (6, 1, 7.5, 0.125), "e3m2": (6, 3, 28, 0.0625), "e4m3": (8, 7, 480, 2.0**-9),
}


def bits_equal(a, b) -> bool:
    """Equal as float32 bit patterns (distinguishes -0 from +0)."""
    return np.array_equal(np.asarray(a, np.float32).view(np.uint32), np.asarray(b, np.float32).view(np.uint32))


def ml_codes(y: np.ndarray, mltype) -> np.ndarray:
    return np.asarray(y, np.float32).astype(mltype).view(np.uint8)


def describe_mismatch(y, got, want):
    bad = np.flatnonzero(got != want)[:8]
    return [(float(y.flat[i]), int(got.flat[i]), int(want.flat[i])) for i in bad]


# --------------------------------------------------------------------------- tables

@pytest.mark.parametrize("name", sorted(ML_EXACT))
def test_table_equals_ml_dtypes_on_every_code(name):
    fmt = formats.get_format(name)
    codes = np.arange(2 ** fmt.bits, dtype=np.uint8)
    want = codes.view(ML_EXACT[name]).astype(np.float32)
    assert fmt.table.shape == (2 ** fmt.bits,)
    assert bits_equal(fmt.table, want)
    assert bits_equal(fmt.decode(codes), want)


@pytest.mark.parametrize("name", sorted(HAND))
def test_table_equals_hand_computed(name):
    fmt = formats.get_format(name)
    pos = np.array(HAND[name], dtype=np.float64)
    assert pos.size == 2 ** (fmt.bits - 1)
    want = np.concatenate([pos, -pos]).astype(np.float32)  # -0.0 at the negative zero code
    assert bits_equal(fmt.table, want)


def test_e4m3_is_float8_e4m3fn_except_code_0x7f():
    fmt = formats.get_format("e4m3")
    codes = np.arange(256, dtype=np.uint8)
    ref = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    nan_codes = {0x7F, 0xFF}
    keep = np.array([c not in nan_codes for c in range(256)])
    assert bits_equal(fmt.table[keep], ref[keep])
    assert fmt.table[0x7F] == 480 and fmt.table[0xFF] == -480


@pytest.mark.parametrize("name,mltype", [("e5m2", ml_dtypes.float8_e5m2), ("e3m4", ml_dtypes.float8_e3m4)])
def test_ieee_like_ml_dtypes_agree_below_the_top_binade(name, mltype):
    """float8_e5m2/e3m4 reserve the all-ones exponent for inf/NaN; ExMy uses it as a binade."""
    fmt = formats.get_format(name)
    codes = np.arange(256, dtype=np.uint8)
    top = ((codes >> fmt.m) & (2 ** fmt.e - 1)) == 2 ** fmt.e - 1
    ref = codes.view(mltype).astype(np.float32)
    assert bits_equal(fmt.table[~top], ref[~top])
    assert np.isfinite(fmt.table[top]).all()


@pytest.mark.parametrize("fmt", ALL, ids=ALL_IDS)
def test_table_equals_spec_formula(fmt):
    assert bits_equal(fmt.table, spec_table(fmt.e, fmt.m))
    for code in range(2 ** fmt.bits):  # float32 holds every value exactly
        assert float(fmt.table[code]) == spec_value(fmt.e, fmt.m, code)


@pytest.mark.parametrize("fmt", ALL, ids=ALL_IDS)
def test_format_properties(fmt):
    e, m = fmt.e, fmt.m
    t = fmt.table
    half = 2 ** (e + m)
    assert fmt.bits == 1 + e + m and fmt.name == f"e{e}m{m}"
    assert sum(fmt.planes) == fmt.bits and list(fmt.planes) == sorted(fmt.planes, reverse=True)
    assert fmt.bias == 2 ** (e - 1) - 1
    assert fmt.emin == 1 - fmt.bias
    assert t.dtype == np.float32
    assert np.isfinite(t).all(), "no NaN or infinity in an ExMy table"
    assert fmt.max == 2.0 ** (2**e - 1 - fmt.bias) * (2 - 2.0**-m)
    assert t.max() == fmt.max == t[half - 1] and t.min() == -fmt.max == t[-1]
    assert fmt.smallest_subnormal == 2.0 ** (fmt.emin - m)
    assert t[1] == fmt.smallest_subnormal  # code 1 is the smallest positive value
    assert np.all(np.diff(t[:half].astype(np.float64)) > 0), "positive half strictly increasing"
    assert bits_equal(t[half:], -t[:half]), "sign bit negates, -0 included"
    assert t[0] == 0 and not np.signbit(t[0]) and t[half] == 0 and np.signbit(t[half])
    # every value also fits bf16 exactly (and fp16 except E = 5)
    assert bits_equal(t.astype(ml_dtypes.bfloat16).astype(np.float32), t)
    if e < 5:
        assert bits_equal(t.astype(np.float16).astype(np.float32), t)


@pytest.mark.parametrize("name", sorted(SPEC_NAMED))
def test_named_formats_match_spec_table(name):
    bits, bias, mx, sub = SPEC_NAMED[name]
    fmt = formats.get_format(name)
    assert (fmt.bits, fmt.bias, fmt.max, fmt.smallest_subnormal) == (bits, bias, mx, sub)
    assert name in formats.NAMED


# --------------------------------------------------------------------------- rounding

def random_inputs(rng, fmt, n=20000) -> np.ndarray:
    """Fresh float32 values over every regime: normal, uniform incl. beyond max, tiny, huge."""
    mx, sub = fmt.max, fmt.smallest_subnormal
    parts = [
        rng.standard_normal(n) * mx / 3,
        rng.uniform(-2 * mx, 2 * mx, n),
        rng.uniform(-4 * sub, 4 * sub, n),  # subnormal range and around it
        rng.standard_normal(n // 4) * 1e-30,  # far below the smallest subnormal
        np.ldexp(rng.uniform(0.5, 1, n // 4), rng.integers(-148, 128, n // 4))
        * rng.choice([-1, 1], n // 4),  # every float32 magnitude (some overflow to inf: dropped)
    ]
    bits = rng.integers(0, 2**32, n // 4, dtype=np.uint64).astype(np.uint32).view(np.float32)
    y = np.concatenate([np.concatenate(parts).astype(np.float32), bits])  # any float32 bit pattern
    return y[np.isfinite(y)]


@pytest.mark.parametrize("name", sorted(ML_EXACT))
def test_rounding_matches_ml_dtypes_on_random_values(name, rng):
    fmt = formats.get_format(name)
    y = random_inputs(rng, fmt)
    got, want = fmt.encode(y), ml_codes(y, ML_EXACT[name])
    assert got.dtype == np.uint8 and got.shape == y.shape
    assert np.array_equal(got, want), describe_mismatch(y, got, want)


def test_e4m3_rounding_matches_float8_e4m3fn_below_448(rng):
    fmt = formats.get_format("e4m3")
    y = random_inputs(rng, fmt)
    y = y[np.abs(y) < 464 - 1]  # float8_e4m3fn has NaN where e4m3 has 480; stay below 464
    got, want = fmt.encode(y), ml_codes(y, ml_dtypes.float8_e4m3fn)
    assert np.array_equal(got, want), describe_mismatch(y, got, want)


def neighbour_midpoints(fmt) -> np.ndarray:
    """All exact midpoints between neighbouring values, both signs (exact in float32)."""
    pos = spec_table(fmt.e, fmt.m)[: 2 ** (fmt.e + fmt.m)]
    mids = (pos[:-1] + pos[1:]) / 2
    mids = np.concatenate([mids, -mids]).astype(np.float32)
    assert np.array_equal(mids.astype(np.float64), np.concatenate([(pos[:-1] + pos[1:]) / 2,
                                                                   -(pos[:-1] + pos[1:]) / 2]))
    return mids


@pytest.mark.parametrize("name", sorted(ML_EXACT))
def test_midpoints_tie_to_even_like_ml_dtypes(name):
    fmt = formats.get_format(name)
    mids = neighbour_midpoints(fmt)
    got = fmt.encode(mids)
    assert np.array_equal(got, ml_codes(mids, ML_EXACT[name]))
    assert np.all(got & 1 == 0), "a tie always picks the even code"
    # one ulp either side of a midpoint is no longer a tie
    up, down = np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))
    for y in (up, down):
        assert np.array_equal(fmt.encode(y), ml_codes(y, ML_EXACT[name]))


@pytest.mark.parametrize("fmt", ALL, ids=ALL_IDS)
def test_rounding_matches_brute_force_oracle(fmt, rng):
    """Every format, incl. those without an ml_dtypes twin: nearest value, ties to even code."""
    pos = spec_table(fmt.e, fmt.m)[: 2 ** (fmt.e + fmt.m)].astype(np.float32)
    mids = neighbour_midpoints(fmt)
    values = np.concatenate([pos, -pos])
    y = np.concatenate([
        random_inputs(rng, fmt, 4000), mids,
        np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
        values, np.nextafter(values, np.float32(np.inf)), np.nextafter(values, np.float32(-np.inf)),
    ]).astype(np.float32)
    got, want = fmt.encode(y), brute_force_encode(y, fmt.e, fmt.m)
    assert np.array_equal(got, want), describe_mismatch(y, got, want)
    assert np.all(fmt.encode(mids) & 1 == 0)


@pytest.mark.parametrize("fmt", ALL, ids=ALL_IDS)
def test_every_value_encodes_to_its_own_code(fmt):
    codes = np.arange(2 ** fmt.bits, dtype=np.uint8)
    assert np.array_equal(fmt.encode(fmt.table), codes)  # -0 included
    assert np.array_equal(fmt.encode(fmt.decode(codes)), codes)


@pytest.mark.parametrize("fmt", ALL, ids=ALL_IDS)
def test_subnormal_boundaries(fmt):
    sub = np.float32(fmt.smallest_subnormal)
    sign = np.uint8(1 << (fmt.e + fmt.m))
    half = np.float32(sub / 2)
    enc = lambda v: int(fmt.encode(np.array([v], np.float32))[0])  # noqa: E731
    assert enc(half) == 0, "half the smallest subnormal ties to code 0 (even)"
    assert enc(-half) == sign, "... and keeps the sign: -0"
    assert enc(np.nextafter(half, np.float32(np.inf))) == 1
    assert enc(-np.nextafter(half, np.float32(np.inf))) == sign | 1
    assert enc(np.nextafter(half, np.float32(0))) == 0
    assert enc(np.float32(1e-45)) == 0 and enc(np.float32(-1e-45)) == sign
    smallest_normal = np.float32(2.0**fmt.emin)
    first_normal_code = 1 << fmt.m
    assert enc(smallest_normal) == first_normal_code
    assert enc(np.nextafter(smallest_normal, np.float32(0))) == first_normal_code
    if fmt.m:
        largest_sub = np.float32((2**fmt.m - 1) * sub)
        assert enc(largest_sub) == first_normal_code - 1
        mid = np.float32((largest_sub + smallest_normal) / 2)
        want = first_normal_code if first_normal_code % 2 == 0 else first_normal_code - 1
        assert enc(mid) == want


@pytest.mark.parametrize("fmt", ALL, ids=ALL_IDS)
def test_saturation(fmt):
    mx = np.float32(fmt.max)
    top = 2 ** (fmt.e + fmt.m) - 1
    sign = 1 << (fmt.e + fmt.m)
    big = np.array([mx, np.nextafter(mx, np.float32(np.inf)), mx * 1.5, mx * 1000, 1e30, 3.4028235e38],
                   dtype=np.float32)
    assert np.all(fmt.encode(big) == top)
    assert np.all(fmt.encode(-big) == sign | top)
    assert np.all(fmt.decode(fmt.encode(big)) == mx)
    # just below max: the value under it or max itself, never beyond
    below = float(fmt.table[top - 1])
    y = np.float32((below + float(mx)) / 2)
    assert fmt.encode(np.array([y]))[0] in (top - 1, top)


def test_negative_zero_semantics():
    for fmt in ALL:
        sign = 1 << (fmt.e + fmt.m)
        codes = fmt.encode(np.array([0.0, -0.0], np.float32))
        assert codes.tolist() == [0, sign], fmt.name
        d = fmt.decode(np.array([0, sign], np.uint8))
        assert d[0] == 0 and not np.signbit(d[0]) and d[1] == 0 and np.signbit(d[1]), fmt.name
        tiny_negative = np.array([-fmt.smallest_subnormal / 4], np.float32)
        assert fmt.encode(tiny_negative)[0] == sign, fmt.name


def test_encode_preserves_shape_and_never_leaves_garbage(rng):
    fmt = formats.get_format("e2m2")
    y = (rng.standard_normal((3, 70001)) * 3).astype(np.float32)  # spans several internal blocks
    got = fmt.encode(y)
    assert got.shape == y.shape and got.dtype == np.uint8
    assert got.max() < 2**fmt.bits
    assert np.array_equal(got, brute_force_encode(y, 2, 2))
    assert np.array_equal(fmt.encode(y[:, ::3]), got[:, ::3])  # strided input
    assert fmt.encode(np.zeros((0, 5), np.float32)).shape == (0, 5)


# --------------------------------------------------------------------------- names

@pytest.mark.parametrize("text,e,m", [("e2m2", 2, 2), ("E3M2", 3, 2), (" e4m3 ", 4, 3), ("e1m0", 1, 0),
                                      ("e5m2", 5, 2), ("e2m5", 2, 5)])
def test_format_name_parsing(text, e, m):
    fmt = formats.get_format(text)
    assert (fmt.e, fmt.m) == (e, m) and fmt.name == f"e{e}m{m}"


def test_all_named_formats_parse_and_all_formats_are_all_valid_exmy():
    for name in formats.NAMED:
        assert formats.get_format(name).name == name
    assert formats.get_format(formats.DEFAULT).name == "e2m2"
    names = {f.name for f in ALL}
    want = {f"e{e}m{m}" for e in range(1, 6) for m in range(0, 6) if 1 + e + m <= 8}
    assert names == want and len(ALL) == len(want)


@pytest.mark.parametrize("text", ["", "fp4", "nvfp4", "e2m", "em2", "e2m2x", "e0m3", "e6m1", "e4m4", "e2m6",
                                  "e10m1", "e1m7", "e3m-1", "float8_e4m3fn", "e2 m2"])
def test_unknown_format_names_raise_exmy_error(text):
    with pytest.raises(ExmyError) as info:
        formats.get_format(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("e,m", [(0, 2), (6, 1), (4, 4), (2, 6), (1, -1)])
def test_invalid_exmy_construction(e, m):
    with pytest.raises(ExmyError):
        formats.ExMy(e, m)
