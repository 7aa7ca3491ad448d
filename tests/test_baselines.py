"""exmyconv.bench.baselines: integer round-to-nearest intB-gG (asymmetric, fp16 scale + zero point per group).

The expected values below are worked out by hand from the scheme in the module docstring.
"""
from __future__ import annotations

import numpy as np
import pytest

from exmyconv.bench import baselines
from exmyconv.bench.baselines import IntScheme


def test_exact_grid_round_trip():
    # int4, one group of 4: range [-1.5, 6] -> scale 7.5/15 = 0.5 (exact in fp16), zero = 3
    x = np.array([[-1.5, 0.0, 0.5, 6.0]], np.float32)
    codes, scales, zeros = IntScheme(4, 4).quantize(x)
    assert codes.tolist() == [[0, 3, 4, 15]]
    assert scales.tolist() == [[0.5]] and zeros.tolist() == [[3.0]]
    np.testing.assert_array_equal(IntScheme(4, 4).fake_quantize(x), x)


def test_round_half_to_even():
    # same grid as above (step 0.5, zero 3); 0.25 and 0.75 are ties: rint -> 0 and 2 steps
    x = np.array([[-1.5, 0.25, 0.75, 6.0, 1.25, -0.25, 2.2, 5.9]], np.float32)
    out = IntScheme(4, 8).fake_quantize(x)
    np.testing.assert_array_equal(out, np.array([[-1.5, 0.0, 1.0, 6.0, 1.0, 0.0, 2.0, 6.0]], np.float32))


def test_range_always_contains_zero_and_fp16_scale():
    # all positive: lo = 0, hi = 4 -> scale = fp16(4/3) = 1.3330078125, zero = 0 (int2: qmax 3)
    x = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    codes, scales, zeros = IntScheme(2, None).quantize(x)
    s = float(np.float16(4 / 3))
    assert scales[0, 0] == s == 1.3330078125
    assert zeros.tolist() == [[0.0]]
    # 1/s = 0.7502 -> 1; 2/s = 1.5004 -> 2; 3/s = 2.2506 -> 2; 4/s = 3.0007 -> 3
    assert codes.tolist() == [[1, 2, 2, 3]]
    np.testing.assert_array_equal(IntScheme(2).fake_quantize(x), np.float32([[s, 2 * s, 2 * s, 3 * s]]))
    # all negative: hi = 0, so zero = qmax and -max|x| is the lowest code
    codes, scales, zeros = IntScheme(3, None).quantize(-x)
    assert zeros.tolist() == [[7.0]] and codes[0, -1] == 0


def test_groups_along_rows_with_short_last_group():
    x = np.arange(20, dtype=np.float32).reshape(2, 10) - 7.0
    scheme = IntScheme(4, 4)  # groups of 4, 4, 2 per row
    codes, scales, zeros = scheme.quantize(x)
    assert codes.shape == (2, 10) and scales.shape == (2, 3) and zeros.shape == (2, 3)
    for r in range(2):
        for j, (a, b) in enumerate(((0, 4), (4, 8), (8, 10))):
            alone = IntScheme(4, None).fake_quantize(x[r:r + 1, a:b])
            np.testing.assert_array_equal(scheme.fake_quantize(x)[r:r + 1, a:b], alone)


def test_zero_group_and_zero_tensor():
    x = np.zeros((3, 8), np.float32)
    x[1, 4:] = [0.5, -0.25, 1.0, 0.0]  # one row with a nonzero second group
    codes, scales, zeros = IntScheme(4, 4).quantize(x)
    assert np.all(scales > 0) and np.isfinite(scales).all()
    assert scales[0, 0] == 1.0 and zeros[0, 0] == 0.0  # all-zero group: scale 1, zero point 0
    out = IntScheme(4, 4).fake_quantize(x)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1, :4], 0.0)
    assert np.all(IntScheme(5, 128).fake_quantize(np.zeros((2, 256), np.float32)) == 0)


def test_never_nan_on_extreme_values(rng):
    x = rng.standard_normal((16, 256)).astype(np.float32)
    x[0] *= 1e30          # scale would overflow fp16: clipped to 65504, codes saturate
    x[1] *= 1e-30         # scale would underflow fp16: clipped to 2^-24
    x[2, ::7] = np.float32(3.4e38)
    x[3] = -np.float32(3.4e38)
    x[4, :] = 1e-45       # float32 subnormal
    for bits, group in ((4, 128), (5, 128), (4, 32), (8, None), (2, 1)):
        out = IntScheme(bits, group).fake_quantize(x)
        assert out.dtype == np.float32 and np.isfinite(out).all(), (bits, group)
        assert np.abs(out[1]).max() <= 2.0**-24 * 2 ** bits  # tiny weights stay tiny


def test_error_at_most_half_a_step(rng):
    x = (rng.standard_normal((64, 512)) * rng.uniform(0.001, 2.0, (64, 1))).astype(np.float32)
    for bits, group in ((4, 128), (5, 128), (4, 32), (3, 64)):
        scheme = IntScheme(bits, group)
        codes, scales, zeros = scheme.quantize(x)
        out = scheme.dequantize(codes, scales, zeros)
        step = np.repeat(scales, group, axis=1)
        # half a step, plus the fp16 rounding of the scale across the group's range
        bound = step * (0.5 + (2**bits - 1) * 2.0**-10)
        assert np.all(np.abs(out - x) <= bound), (bits, group)
        assert np.all(codes <= 2**bits - 1)
        assert np.all(zeros == np.rint(zeros)) and np.all((zeros >= 0) & (zeros <= 2**bits - 1))


def test_more_bits_or_smaller_groups_reduce_error(rng):
    x = rng.standard_normal((32, 1024)).astype(np.float32) * 0.02
    err = {name: baselines.relative_error(x, baselines.parse(name).fake_quantize(x))
           for name in ("int4-g128", "int4-g32", "int5-g128", "int8")}
    assert err["int4-g32"] < err["int4-g128"]
    assert err["int5-g128"] < err["int4-g128"]
    assert err["int8"] < err["int5-g128"]
    assert 0.05 < err["int4-g128"] < 0.15  # ~ step/sqrt(12) relative to a Gaussian's spread


def test_bits_accounting():
    assert IntScheme(4, 128).bits_per_weight((4096, 4096)) == 4.25
    assert IntScheme(5, 128).bits_per_weight((4096, 4096)) == 5.25
    assert IntScheme(4, 32).bits_per_weight((11008, 4096)) == 5.0
    assert IntScheme(4, 64).bits_per_weight((8, 128)) == 4.5
    assert IntScheme(8, None).bits_per_weight((3, 64)) == 8.5  # one group per row
    # K = 576 = 4.5 groups of 128: every row holds 5 scale/zero pairs
    assert IntScheme(4, 128).storage_bits((1536, 576)) == 1536 * (576 * 4 + 5 * 32)
    # 3-D (stacked experts) counts rows over the leading dimensions
    assert IntScheme(4, 128).storage_bits((2, 3, 256)) == 6 * (256 * 4 + 2 * 32)
    assert IntScheme(4, 1000).groups(256) == (256, 1)


def test_names_and_shapes():
    assert baselines.parse("int4-g128") == IntScheme(4, 128)
    assert baselines.parse("INT5-G128").name == "int5-g128"
    assert baselines.parse("int8").group_size is None
    for bad in ("int1", "int9", "int4-g0", "fp4", "int4-g"):
        with pytest.raises(ValueError):
            baselines.parse(bad)
    x = np.ones((2, 3, 40), np.float32)
    assert baselines.fake_quantize(x, 4, 16).shape == (2, 3, 40)
    assert baselines.relative_error(np.zeros(4), np.ones(4)) == 0.0
