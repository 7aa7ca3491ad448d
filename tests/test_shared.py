"""Mantissa-shared formats (eXmYsk): exact shared-bit search, packing, layout, pipeline."""
import numpy as np
import pytest

from exmyconv.format import exmy as formats
from exmyconv.io.checkpoint import Checkpoint
from exmyconv.format.pack import pack_codes, row_bytes, unpack_codes
from exmyconv.convert.pipeline import Options, convert
from exmyconv.format.quant import quantize

from conftest import make_checkpoint

SHARED = [formats.get_format(n) for n in formats.NAMED_SHARED] + [
    formats.get_format(n) for n in ("e3m2s2", "e1m1s8", "e2m1s5", "e4m3s3")]


def brute_force_shared(fmt, y, weight):
    """Per group and bit: brute-force nearest code with that last bit; keep the cheaper bit."""
    mags = fmt.table[: 2 ** (fmt.e + fmt.m)].astype(np.float64)
    codes = np.arange(mags.size)
    out = np.zeros(y.shape, np.uint8)
    k = fmt.share
    for r in range(y.shape[0]):
        for start in range(0, y.shape[1], k):
            cols = range(start, min(start + k, y.shape[1]))
            best = None
            for b in (0, 1):
                cand = codes[codes % 2 == b]
                picks, err = [], 0.0
                for c in cols:
                    a = abs(float(y[r, c]))
                    d = np.abs(mags[cand] - a)
                    ties = cand[d == d.min()]
                    pick = ties[0] if len(ties) == 1 else [t for t in ties if (t >> 1) % 2 == 0][0]
                    picks.append(pick)
                    err += float(weight[r, c]) * (a - mags[pick]) ** 2
                if best is None or err < best[0]:
                    best = (err, picks)
            for c, pick in zip(cols, best[1]):
                out[r, c] = pick | (int(np.signbit(y[r, c])) << (fmt.e + fmt.m))
    return out


@pytest.mark.parametrize("fmt", SHARED, ids=lambda f: f.name)
def test_shared_bit_search_matches_brute_force(fmt, rng):
    rows, k = 3, 37
    y = (rng.standard_normal((rows, k)) * fmt.max / 3).astype(np.float32)
    y[0, :5] = 0.0
    y[1, 3] = -0.0
    y[2, -4:] = fmt.max * 1.5  # saturating values
    mids = (fmt.table[1:8] + fmt.table[:7]) / 2  # exact ties with the unshared grid
    y[1, 10:17] = mids
    weight = rng.uniform(0.1, 3.0, (rows, k))
    got = fmt.encode(y, weight)
    assert np.array_equal(got, brute_force_shared(fmt, y, weight))
    groups = np.pad(got & 1, ((0, 0), (0, -k % fmt.share))).reshape(rows, -1, fmt.share)
    real = np.pad(np.ones((rows, k), bool), ((0, 0), (0, -k % fmt.share))).reshape(rows, -1, fmt.share)
    first = groups[..., :1]
    assert np.all((groups == first) | ~real)


@pytest.mark.parametrize("fmt", SHARED, ids=lambda f: f.name)
@pytest.mark.parametrize("k", [1, 5, 31, 33, 127, 128, 129, 300, 576, 1000])
def test_pack_round_trip_and_size(fmt, k, rng):
    y = (rng.standard_normal((4, k)) * 2).astype(np.float32)
    codes = fmt.encode(y)
    payload = pack_codes(codes, fmt)
    kp = 32 * -(-k // 32)
    shared_bytes = 4 * -(-(-(-kp // fmt.share)) // 32)
    assert payload.shape == (4, kp * (fmt.bits - 1) // 8 + shared_bytes) == (4, row_bytes(fmt, k))
    assert np.array_equal(unpack_codes(payload, fmt, k), codes)


def test_e2m2s4_literal_layout():
    fmt = formats.get_format("e2m2s4")
    # codes (5 bits): element i; groups {0..3} share m0=1, {4..7} share m0=0
    codes = np.array([[0b10011, 0b00001, 0b01111, 0b11101, 0b00100, 0b10010, 0b01110, 0b00000]], np.uint8)
    payload = pack_codes(codes, fmt)
    assert payload.shape == (1, 16 + 4)
    own = codes[0] >> 1  # [s e1 e0 m1] nibbles, even element in the low nibble
    expected_nibbles = [own[0] | own[1] << 4, own[2] | own[3] << 4, own[4] | own[5] << 4, own[6] | own[7] << 4]
    assert list(payload[0, :4]) == expected_nibbles and not payload[0, 4:16].any()
    assert payload[0, 16] == 0b01 and not payload[0, 17:].any()  # group 0 bit 1, group 1 bit 0
    assert np.array_equal(unpack_codes(payload, fmt, 8), codes)


def test_shared_error_sits_between_neighbours(rng):
    x = rng.standard_normal((256, 1024)).astype(np.float32)

    def err(name):
        d = quantize(x, formats.get_format(name)).dequantize()
        return np.linalg.norm(d - x) / np.linalg.norm(x)

    assert err("e2m2") < err("e2m2s4") < err("e2m1")
    assert err("e2m3") < err("e2m3s3") < err("e2m2")


def test_pipeline_round_trip_shared(tmp_path, rng):
    w = {"layer.w.weight": (rng.standard_normal((24, 200)) * 0.05).astype(np.float32),
         "layer.e.weight": (rng.standard_normal((2, 6, 99)) * 0.05).astype(np.float32)}
    src = make_checkpoint(tmp_path / "src", w)
    for name, group in (("e2m2s4", None), ("e2m3s3", 64)):
        out = tmp_path / name
        convert(str(src), str(out), Options(format=name, group_size=group), progress=False)
        with Checkpoint(str(out)) as ckpt:
            for t, x in w.items():
                want = quantize(x, formats.get_format(name), group).dequantize()
                assert np.array_equal(ckpt.dequantize(t), want)
