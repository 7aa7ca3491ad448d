"""Checks that formats/SPEC.md is enough to read exmy checkpoints bit for bit.

``spec_decoder`` is an independent decoder written from the spec alone; these tests hold it
against the published test vectors, against ml_dtypes' tables, and against exmyconv's own
reader (``exmyconv.io.checkpoint.load_state_dict``) on checkpoints written by the CLI.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_decoder as sd  # noqa: E402

from exmyconv.torch.state_dict import load_state_dict  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "formats", "vectors")
VECTOR_FILES = sorted(glob.glob(os.path.join(VECTORS, "*.safetensors")))
V1_FILES = sorted(glob.glob(os.path.join(VECTORS, "v1", "*.safetensors")))  # the same cases in layout 1.2

# formats/vectors/README.md: case -> (format, group size or None for per channel)
VECTOR_CASES = {
    "e2m2": ("e2m2", None), "e2m2-g32": ("e2m2", 32), "e2m1-g64": ("e2m1", 64),
    "e3m1": ("e3m1", None), "e2m3": ("e2m3", None), "e3m2-g100": ("e3m2", 100),
    "e4m3": ("e4m3", None), "e1m1": ("e1m1", None), "e3m3": ("e3m3", 16),
    "e5m2": ("e5m2", None), "e1m0": ("e1m0", None), "e3m0-g48": ("e3m0", 48),
    "e2m2s4": ("e2m2s4", None), "e2m3s3-g64": ("e2m3s3", 64),
    "e1m1s2": ("e1m1s2", None), "e4m3s8-g32": ("e4m3s8", 32),  # 1.2: other plane layouts of shared formats
    "e2m1-g32-s8": ("e2m1", 32), "e2m2s4-g64-s8": ("e2m2s4", 64),  # 2.0: 8-bit scales
}
SCALES8_CASES = {"e2m1-g32-s8", "e2m2s4-g64-s8"}
FOLDER_CASES = ["sharded-e2m3s3-g64", "tied-e2m2"]  # formats/vectors/README.md, "Checkpoint folders"
VECTOR_SOURCES = {  # name -> (source dtype, shape), from the README
    "layer.sweep.weight": ("F32", [2, 150]),
    "layer.zero_row.weight": ("F16", [3, 130]),
    "layer.experts.weight": ("BF16", [2, 4, 96]),
}

OUT = {"F32": (torch.float32, torch.int32, np.uint32),
       "F16": (torch.float16, torch.int16, np.uint16),
       "BF16": (torch.bfloat16, torch.int16, np.uint16)}
TORCH_BITS = {torch.float32: (torch.int32, np.uint32), torch.float16: (torch.int16, np.uint16),
              torch.bfloat16: (torch.int16, np.uint16)}
ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32"}


def torch_bits(t: torch.Tensor) -> np.ndarray:
    """Bit patterns of a float tensor (so that -0.0 and NaN payloads are compared too)."""
    ibits, nbits = TORCH_BITS[t.dtype]
    return t.detach().contiguous().view(ibits).numpy().view(nbits)


def check_scales(q: sd.QuantizedTensor) -> None:
    """SPEC.md section 2: no scale is zero, subnormal, infinite or NaN; F16 scales never let
    fp16 dequantization overflow."""
    s = q.scales_f32().astype(np.float64)
    tiny = np.finfo(np.float16).tiny if q.scale_dtype == "F16" else float(np.finfo(np.float32).tiny)
    assert np.all(np.isfinite(s)) and np.all(s >= tiny), q.name
    if q.scale_dtype == "F16":
        E, M = sd.parse_format(q.format)
        assert np.all(s * sd.exmy_max(E, M) <= 65504), q.name


def check_padding(q: sd.QuantizedTensor) -> None:
    """SPEC.md section 3: codes past K are padded with code 0.

    Shared formats: the per-element planes hold 0 past K; the padding elements of a share group
    that also holds real elements take that group's bit ("decode to codes 0 or 1"); the bits
    of groups wholly past K are 0 (padding code 0); the rest of the shared plane (past bit
    ceil(Kp/k)) is zero."""
    E, M, k = sd.parse_format_full(q.format)
    K = q.shape[-1]
    Kp = sd.padded_length(K, q.major)
    codes = q.codes(padded=True)
    assert codes.shape[-1] == Kp
    if k is None:
        assert not codes[..., K:].any(), q.name
        return
    high, shared = q.planes()
    assert not high[..., K:].any(), q.name
    pad = codes[..., K:]
    assert np.all(pad <= 1), q.name
    assert np.array_equal(pad, shared[..., np.arange(K, Kp) // k]), q.name
    nbits = -(-Kp // k)
    assert shared.shape[-1] == 8 * sd.shared_plane_bytes(Kp, k, q.major) >= nbits
    assert not shared[..., -(-K // k):nbits].any(), f"{q.name}: shared bit of an all-padding group"
    assert not shared[..., nbits:].any(), f"{q.name}: shared plane tail not zero"


def check_shared_groups(codes: np.ndarray, k: int, what: str, start: int = 0, stop: int | None = None) -> None:
    """Every group of k consecutive elements ``start + k*j .. start + k*j + k-1`` (cut at ``stop``)
    of each row has one last code bit; a last group cut short is checked on its real elements."""
    m0 = codes[..., start:stop] & 1
    n = m0.shape[-1]
    nf = n // k * k
    full = m0[..., :nf].reshape(m0.shape[:-1] + (n // k, k))
    bad = np.argwhere(np.any(full != full[..., :1], axis=-1))
    assert bad.size == 0, f"{what}: group(s) with mixed m0, first (row..., group) {bad[:3].tolist()}"
    tail = m0[..., nf:]
    if tail.shape[-1]:
        assert np.all(tail == tail[..., :1]), f"{what}: short last group with mixed m0"


def shared_groups_hold(codes: np.ndarray, k: int, start: int = 0, stop: int | None = None) -> bool:
    try:
        check_shared_groups(codes, k, "", start, stop)
    except AssertionError:
        return False
    return True


def codes_from_values(values: np.ndarray, q: sd.QuantizedTensor) -> np.ndarray:
    """Recover the codes from exact dequantized float32 values (someone else's decoding: the
    published vectors, or load_state_dict's output) and this tensor's scales, by inverting the
    ExMy table of SPEC.md section 1; -0.0 maps to code 1 0...0.  Fails unless every value is
    exactly code value x scale."""
    E, M = sd.parse_format(q.format)
    K, G = q.shape[-1], q.group_size
    v = np.asarray(values, dtype=np.float32).reshape(q.shape)
    scale = q.scales_f32().astype(np.float64)[..., np.arange(K) // G]
    ratio = np.abs(v.astype(np.float64)) / scale               # exact: v = value * scale exactly
    table = sd.exmy_values(E, M)[: 1 << (E + M)].astype(np.float64)   # codes 0 ... (sign clear)
    idx = np.clip(np.searchsorted(table, ratio), 0, len(table) - 1)
    assert np.array_equal(table[idx] * scale, np.abs(v.astype(np.float64))), \
        f"{q.name}: values that are not ExMy code x scale"
    sign = (v.view(np.uint32) >> np.uint32(31)).astype(np.uint8)
    return (sign << np.uint8(E + M)) | idx.astype(np.uint8)


def check_shared_codes(q: sd.QuantizedTensor, values: np.ndarray, what: str) -> None:
    """For a shared format: the codes behind ``values`` (recovered independently of the shared
    plane) equal the decoded ones, and every share group of each row has one m0."""
    _E, _M, k = sd.parse_format_full(q.format)
    theirs = codes_from_values(values, q)
    assert np.array_equal(theirs, q.codes()), f"{what} {q.name}: codes differ"
    if k is not None:
        check_shared_groups(theirs, k, f"{what} {q.name}")


# ============================================================================ ExMy numbers

SPEC_TABLE = {  # SPEC.md section 1: name -> (bits, bias, max, smallest subnormal)
    "e2m1": (4, 1, 6, 0.5), "e2m2": (5, 1, 7, 0.25), "e3m1": (5, 3, 24, 0.125),
    "e2m3": (6, 1, 7.5, 0.125), "e3m2": (6, 3, 28, 0.0625), "e4m3": (8, 7, 480, 2.0 ** -9),
}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_named_format_table(name):
    bits, bias, vmax, sub = SPEC_TABLE[name]
    E, M = sd.parse_format(name)
    v = sd.exmy_values(E, M).astype(np.float64)
    assert 1 + E + M == bits and (1 << (E - 1)) - 1 == bias
    assert v.max() == vmax == sd.exmy_max(E, M)
    assert v[v > 0].min() == sub
    assert v.min() == -vmax


def test_all_formats_basic_properties():
    for E in range(1, 6):
        for M in range(0, 6):
            if 1 + E + M > 8:
                with pytest.raises(ValueError):
                    sd.parse_format(f"e{E}m{M}")
                continue
            v = sd.exmy_values(E, M)
            half = len(v) // 2
            pos = v[:half].astype(np.float64)
            assert np.all(np.diff(pos) > 0), (E, M)            # magnitudes increase with code
            assert np.all(np.isfinite(v))                        # no inf, no NaN
            assert np.array_equal(v[half:], -v[:half])
            assert v[half].view(np.uint32) == 0x80000000       # code 1 0...0 is -0
            assert pos.max() == sd.exmy_max(E, M)
            # exactly representable in bf16, and in fp16 except E = 5
            assert np.array_equal(sd.bf16_bits_to_f32(sd.f32_to_bf16_bits(v)), v)
            if E < 5:
                assert np.array_equal(sd.f32_to_f16_bits(v).view(np.float16).astype(np.float32), v)
    for bad in ("e0m2", "e6m1", "e2m6", "e4m4", "E2M2", "e2m", "fp8", "e2m2x"):
        with pytest.raises(ValueError):
            sd.parse_format(bad)


def test_shared_format_names():
    # SPEC.md section 1 (1.1): eXmYsk, M >= 1, 2 <= k <= 8, values of eXmY
    assert sd.parse_format_full("e2m2s4") == (2, 2, 4)
    assert sd.parse_format_full("e2m3s3") == (2, 3, 3)
    assert sd.parse_format_full("e2m2") == (2, 2, None)
    assert sd.parse_format_full("e1m1s2") == (1, 1, 2) and sd.parse_format_full("e4m3s8") == (4, 3, 8)
    assert sd.parse_format("e2m3s3") == (2, 3)
    for E in range(1, 6):
        for M in range(1, 6):
            for k in range(2, 9):
                if 1 + E + M <= 8:
                    assert sd.parse_format_full(f"e{E}m{M}s{k}") == (E, M, k)
                else:
                    with pytest.raises(ValueError):
                        sd.parse_format_full(f"e{E}m{M}s{k}")
    for bad in ("e2m0s2", "e3m0s4", "e2m2s1", "e2m2s0", "e2m2s9", "e2m2s10", "e2m2S4", "E2M2S4",
                "e2m2s", "e2m2s4x", "e4m4s2", "e2m2s04", "e02m2", "e2m2k4"):
        with pytest.raises(ValueError):
            sd.parse_format_full(bad)


@pytest.mark.parametrize("name, mldt", [
    ("e2m1", ml_dtypes.float4_e2m1fn),
    ("e2m3", ml_dtypes.float6_e2m3fn),
    ("e3m2", ml_dtypes.float6_e3m2fn),
])
def test_formula_matches_ml_dtypes(name, mldt):
    E, M = sd.parse_format(name)
    codes = np.arange(1 << (1 + E + M), dtype=np.uint8)
    ref = codes.view(mldt).astype(np.float32)
    assert np.array_equal(sd.exmy_values(E, M).view(np.uint32), ref.view(np.uint32))


def test_e4m3_and_e5m2_differ_from_fp8_only_in_top_binade():
    v = sd.exmy_values(4, 3)
    ref = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    same = np.ones(256, bool)
    same[[0x7F, 0xFF]] = False
    assert np.array_equal(v[same].view(np.uint32), ref[same].view(np.uint32))
    assert v[0x7F] == 480 and v[0xFF] == -480 and np.isnan(ref[0x7F])   # SPEC.md section 1
    v = sd.exmy_values(5, 2)
    ref = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e5m2).astype(np.float32)
    top = ((np.arange(256) >> 2) & 0x1F) == 0x1F                       # inf/NaN in float8_e5m2
    assert np.array_equal(v[~top].view(np.uint32), ref[~top].view(np.uint32))
    assert list(v[0x7C:0x80]) == [65536, 81920, 98304, 114688]


# ============================================================================ rounding helpers

def _rounding_inputs() -> np.ndarray:
    rng = np.random.default_rng(1234)
    rand = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    # every fp16 value, and the midpoints between neighbours (ties), incl. subnormals and the
    # midpoint between 65504 and 65536
    h = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    nxt = np.append(h[1:], 65536.0)
    mids = ((h + nxt) / 2).astype(np.float32)
    near = np.concatenate([np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))])
    b = np.arange(0, 0x7F80, dtype=np.uint32) << 16                    # every finite bf16 ...
    bmid = (b | 0x8000).view(np.float32)                               # ... and the ties above
    x = np.concatenate([rand, h.astype(np.float32), mids, near, b.view(np.float32), bmid,
                        np.float32([0, np.inf, 3.4028235e38, 1e-45, 2.0 ** -25, 2.0 ** -24])])
    return np.concatenate([x, -x])


def test_f16_rounding_matches_ieee():
    x = _rounding_inputs()
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(sd.f32_to_f16_bits(x), ref)
    assert np.all(np.isnan(sd.f32_to_f16_bits(np.float32([np.nan])).view(np.float16)))


def test_bf16_rounding_matches_ml_dtypes():
    x = _rounding_inputs()
    x = x[~np.isnan(x)]
    ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(sd.f32_to_bf16_bits(x), ref)
    assert np.all(np.isnan(sd.bf16_bits_to_f32(sd.f32_to_bf16_bits(np.float32([np.nan])))))


def test_plane_widths():
    # SPEC.md section 3 table
    assert {b: sd.plane_widths(b) for b in range(2, 9)} == {
        8: [8], 7: [4, 2, 1], 6: [4, 2], 5: [4, 1], 4: [4], 3: [2, 1], 2: [2]}


def test_unpack_example_e2m2():
    # Hand-built row: code c_i = i % 32 for i < 130 (e2m2, b = 5), padded to Kp = 160.
    K, Kp = 130, 160
    codes = np.zeros(Kp, np.uint8)
    codes[:K] = np.arange(K) % 32
    hi, lo = codes >> 1, codes & 1                     # 4-bit plane [s e1 e0 m1], 1-bit plane m0
    plane4 = (hi[0::2] | (hi[1::2] << 4)).astype(np.uint8)
    plane1 = np.packbits(lo, bitorder="little")
    row = np.concatenate([plane4, plane1])[None]
    assert row.shape == (1, Kp * 5 // 8)
    assert np.array_equal(sd.unpack_codes(row, K, 5)[0], codes[:K])


def test_unpack_example_e2m2s4_bytes():
    # SPEC.md section 3, by hand: K = 8, Kp = 32; e2m2s4 has one 4-bit plane [s e1 e0 m1]
    # (16 bytes) and a shared plane of ceil(32/4) = 8 bits, padded to 4 bytes.
    assert sd.row_bytes(8, 5, 4) == 16 + 4
    row = np.zeros(20, np.uint8)
    row[:4] = [0x21, 0x43, 0x65, 0x87]   # code >> 1 = 1, 2, ..., 8 (even i in the low nibble)
    row[16] = 0b01                        # elements 0-3 share m0 = 1, elements 4-7 m0 = 0
    assert sd.unpack_codes(row[None], 8, 5, 4)[0].tolist() == [3, 5, 7, 9, 10, 12, 14, 16]
    full = sd.unpack_codes(row[None], 8, 5, 4, padded=True)[0]
    assert full.shape == (32,) and not full[8:].any()
    # (plain e2m2 with K = 8 is 20 bytes per row too: only the format name tells them apart)
    assert sd.row_bytes(8, 5) == 20 and sd.unpack_codes(row[None], 8, 5)[0].tolist() != [3, 5, 7, 9, 10, 12, 14, 16]
    row[16] = 0b10                        # now elements 4-7 have m0 = 1
    assert sd.unpack_codes(row[None], 8, 5, 4)[0].tolist() == [2, 4, 6, 8, 11, 13, 15, 17]


def pack_reference(codes: np.ndarray, b: int, k: int | None, major: int = 2) -> np.ndarray:
    """Test-side writer following SPEC.md section 3 word for word, via numpy.packbits (a second
    code path, independent of spec_decoder's reader).  ``codes``: one padded row (Kp codes);
    for a shared format every group's codes must already agree on m0. ``major`` 1: the 1.x padding
    of section 5 (shared plane in 16-byte units instead of 4)."""
    unit = 4 if major == 2 else 16
    Kp = codes.shape[-1]
    hb = b if k is None else b - 1
    hi = codes.astype(np.uint16) >> (0 if k is None else 1)
    widths = [8] if hb == 8 else [w for w in (4, 2, 1) if hb & w]
    parts, used = [], hb
    for w in widths:
        used -= w
        fld = (hi >> used) & ((1 << w) - 1)                     # most significant bits first
        bits = (fld[:, None] >> np.arange(w)) & 1                # field's own LSB lowest
        parts.append(np.packbits(bits.reshape(-1).astype(np.uint8), bitorder="little"))
        assert parts[-1].size == Kp * w // 8 and parts[-1].size % unit == 0
    if k is not None:
        nbits = -(-Kp // k)
        groups = np.arange(nbits)
        m0 = (codes[np.minimum(groups * k, Kp - 1)] & 1).astype(np.uint8)
        plane = np.packbits(m0, bitorder="little")
        size = unit * -(-nbits // (8 * unit))
        parts.append(np.concatenate([plane, np.zeros(size - plane.size, np.uint8)]))
    return np.concatenate(parts)


@pytest.mark.parametrize("fmt", ["e1m1s2", "e2m1s8", "e2m2s4", "e2m3s3", "e3m2s5", "e1m5s7",
                                 "e2m4s6", "e4m3s8", "e5m2s6", "e2m2", "e4m3", "e1m0"])
def test_unpack_random_rows(fmt):
    """Round trip through an independent packer, for every per-element plane split (b - 1 = 2 ... 7)
    and several share counts, with K around the 128-element padding boundary."""
    E, M, k = sd.parse_format_full(fmt)
    b = 1 + E + M
    rng = np.random.default_rng(b * 10 + (k or 0))
    for K, major in [(K, 2) for K in (1, 3, 31, 32, 33, 40, 127, 128, 129, 130, 300, 384, 576)] + \
            [(K, 1) for K in (1, 40, 128, 129, 300, 576)]:
        Kp = sd.padded_length(K, major)
        rows = []
        for _ in range(3):
            codes = np.zeros(Kp, np.uint8)
            codes[:K] = rng.integers(0, 1 << b, K)
            if k is not None:                        # give every share group one m0
                m0 = rng.integers(0, 2, -(-Kp // k)).astype(np.uint8)
                m0[-(-K // k):] = 0                  # groups wholly past K: padding code 0
                codes[:K] = (codes[:K] & 0xFE) | m0[np.arange(K) // k]
            rows.append((codes, pack_reference(codes, b, k, major)))
        packed = np.stack([r[1] for r in rows])
        assert packed.shape == (3, sd.row_bytes(K, b, k, major))
        want = np.stack([r[0] for r in rows])
        assert np.array_equal(sd.unpack_codes(packed, K, b, k, major=major), want[:, :K]), (fmt, K)
        assert np.array_equal(sd.unpack_codes(packed, K, b, k, padded=True, major=major)[:, :K], want[:, :K])
        with pytest.raises(ValueError):
            sd.unpack_codes(packed[:, :-4], K, b, k, major=major)


def test_row_bytes_formula():
    # SPEC.md section 3: Kp*b/8, or Kp*(b-1)/8 + 4*ceil(ceil(Kp/k)/32), Kp = 32*ceil(K/32)
    assert sd.row_bytes(150, 5, 4) == 80 + 8 and sd.row_bytes(96, 5, 4) == 48 + 4
    assert sd.row_bytes(150, 6, 3) == 100 + 8 and sd.row_bytes(96, 6, 3) == 60 + 4
    assert sd.row_bytes(384, 5, 4) == 192 + 12 and sd.row_bytes(1536, 5, 4) == 768 + 48
    assert sd.row_bytes(384, 6, 3) == 240 + 16 and sd.row_bytes(1536, 6, 3) == 960 + 64
    assert sd.row_bytes(384, 5) == 240 and sd.row_bytes(1, 8) == 32
    assert sd.row_bytes(576, 5) == 360 and sd.row_bytes(576, 5, 4) == 288 + 20  # issue 20's K = 576
    # 1.x (section 5): Kp = 128*ceil(K/128), the shared plane in 16-byte units
    assert sd.row_bytes(150, 5, 4, major=1) == 128 + 16 and sd.row_bytes(96, 5, 4, major=1) == 64 + 16
    assert sd.row_bytes(384, 5, 4, major=1) == 192 + 16 and sd.row_bytes(1536, 6, 3, major=1) == 960 + 64
    assert sd.row_bytes(576, 5, major=1) == 400 and sd.row_bytes(1, 8, major=1) == 128


# ============================================================================ test vectors

def test_vectors_present():
    names = {os.path.basename(p)[: -len(".safetensors")] for p in VECTOR_FILES}
    assert names == set(VECTOR_CASES)


def test_v1_vectors_present():
    names = [os.path.basename(p)[: -len(".safetensors")] for p in VECTOR_FILES]
    assert [os.path.basename(p) for p in V1_FILES] == [f"{n}.safetensors" for n in names if n not in SCALES8_CASES]


@pytest.mark.parametrize("path", VECTOR_FILES + V1_FILES, ids=lambda p: os.path.relpath(p, VECTORS))
def test_vector(path):
    case = os.path.basename(path)[: -len(".safetensors")]
    fmt, group = VECTOR_CASES[case]
    with open(path[: -len(".safetensors")] + ".json") as fh:
        expected = json.load(fh)
    ckpt = sd.read_file(path)
    version = "1.2" if path in V1_FILES else "2.0"
    assert ckpt.metadata["format"] == "pt" and ckpt.metadata["exmy_version"] == version
    for q in ckpt.quantized.values():  # 8-bit scales exactly in the cases that say so (SPEC.md section 2)
        assert (q.scale_dtype == "F8_E4M3") == (case in SCALES8_CASES) == ("scale_exp" in q.info)
    assert set(expected) == set(ckpt.quantized) == set(VECTOR_SOURCES)
    assert list(ckpt.plain) == ["layer.norm.weight"] and ckpt.plain["layer.norm.weight"].data.ndim == 1
    k = sd.parse_format_full(fmt)[2]
    if k is not None and k != 2:
        # "padded with code 0" holds for the b - 1 plane bits only: a share block cut by K gives
        # its padding elements its bit, so padding codes of 1 occur (K = 130 and 150; k = 2 cuts none)
        assert any((q.codes(padded=True)[..., q.shape[-1]:] == 1).any() for q in ckpt.quantized.values())
    for name, exp in expected.items():
        q = ckpt.quantized[name]
        assert (q.format, q.shape) == (exp["format"], exp["shape"]) and q.format == fmt
        assert (q.source_dtype, q.shape) == VECTOR_SOURCES[name]
        # a requested group size larger than K is recorded as K (e3m2-g100 experts: K = 96)
        assert q.group_size == min(group or q.shape[-1], q.shape[-1])
        check_scales(q)
        check_padding(q)
        # the codes behind the published exact values (not through our plane reader) are ours,
        # and for a shared format each share group of a row, counted from the row start across
        # scale-group boundaries, has one m0
        exact = np.array([int(h, 16) for h in exp["f32_bits"]], dtype=np.uint32).view(np.float32)
        check_shared_codes(q, exact, case)
        for key, out, width in (("f32_bits", "F32", 8), ("f16_bits", "F16", 4), ("bf16_bits", "BF16", 4)):
            got = q.dequantize_bits(out).ravel()
            want = np.array([int(h, 16) for h in exp[key]], dtype=got.dtype)
            assert all(len(h) == width for h in exp[key])
            mism = np.flatnonzero(got != want)
            assert mism.size == 0, (
                f"{case} {name} {key}: {mism.size} mismatches, first at {mism[:5].tolist()}: "
                f"got {[hex(v) for v in got[mism[:3]]]} want {[hex(v) for v in want[mism[:3]]]}")
    # exmyconv's own reader (1.x payloads re-padded on read) gives the same exact values
    ref = load_state_dict(path, dtype=torch.float32)
    for name, exp in expected.items():
        want = np.array([int(h, 16) for h in exp["f32_bits"]], dtype=np.uint32)
        assert np.array_equal(torch_bits(ref[name]).ravel(), want), name


def _hex_bits(q: sd.QuantizedTensor, exp: dict) -> None:
    for key, out in (("f32_bits", "F32"), ("f16_bits", "F16"), ("bf16_bits", "BF16")):
        got = q.dequantize_bits(out).ravel()
        want = np.array([int(h, 16) for h in exp[key]], dtype=got.dtype)
        assert np.array_equal(got, want), f"{q.name} {key}"


@pytest.mark.parametrize("case", FOLDER_CASES + [f"v1/{c}" for c in FOLDER_CASES])
def test_folder_vector(case):
    """SPEC.md section 4: index keys are stored names, in the file that holds them; a tied lm_head is
    not stored and not output; integer tensors are output as stored; config.json's quantization_config."""
    folder = os.path.join(VECTORS, case)
    version = "1.2" if case.startswith("v1/") else "2.0"
    with open(folder + ".json") as fh:
        expected = json.load(fh)
    ckpt = sd.read_checkpoint(folder)
    assert [os.path.basename(f) for f in ckpt.files] == expected["files"]
    assert ckpt.outputs() == expected["outputs"] and ckpt.tied == expected["tied"]
    assert set(ckpt.quantized) == set(expected["quantized"])
    qc = ckpt.config["quantization_config"]
    assert qc["quant_method"] == "exmy" and qc["format_version"] == version
    for f in ckpt.files:
        md, _ = sd.read_safetensors(f)
        assert md["exmy_version"] == version
    for name, exp in expected["quantized"].items():
        q = ckpt.quantized[name]
        assert (q.format, q.shape) == (exp["format"], exp["shape"])
        check_padding(q)
        _hex_bits(q, exp)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.basename(case).startswith("sharded"):
        assert len(ckpt.files) == 2
        with open(index) as fh:
            keys = set(json.load(fh)["weight_map"])
        assert keys == set(ckpt.stored_in) and not keys & set(ckpt.quantized)  # T_packed/T_scale, never T
    else:
        assert not os.path.exists(index)
        assert ckpt.tied == {"lm_head.weight": "model.embed_tokens.weight"}
        assert "lm_head.weight" not in ckpt.outputs() and "model.embed_tokens.weight" in ckpt.quantized
        ids = ckpt.plain["model.position_ids"]
        assert ids.dtype == "I64" and ids.data.tolist() == [list(range(8))]
    # exmyconv's own reader outputs the same names and the same values
    ref = load_state_dict(folder, dtype=torch.float32)
    assert sorted(ref) == ckpt.outputs()
    for name, q in ckpt.quantized.items():
        assert np.array_equal(torch_bits(ref[name]).ravel(), q.dequantize_bits("F32").ravel()), name


def test_decoder_refuses_what_exmyconv_refuses(tmp_path):
    """SPEC.md section 6 is complete: on structure-aware damage to real conversions (the reader fuzzer's
    cases), the independent decoder and exmyconv accept and refuse the same files, and decode the
    accepted ones to the same values."""
    from exmyconv.errors import ExmyError
    from exmyconv.io.checkpoint import open_checkpoint
    from fuzz_reader import make_bases, make_case

    bases = make_bases(tmp_path / "bases")
    accepted = refused = 0
    for i in range(300):
        target, what = make_case(4242, i, bases, tmp_path / "cases")
        try:
            ours = sd.read_checkpoint(str(target))
        except ValueError as err:
            ours = err
        try:
            with open_checkpoint(str(target)) as ckpt:
                theirs = {n: ckpt.dequantize(n, "F32") for n in ckpt.records}
        except ExmyError as err:
            theirs = err
        assert isinstance(ours, ValueError) == isinstance(theirs, ExmyError), f"case {i} ({what}): {ours!r} / {theirs!r}"
        if isinstance(ours, ValueError):
            refused += 1
            continue
        accepted += 1
        assert set(ours.quantized) == set(theirs), what
        for name, q in ours.quantized.items():
            assert np.array_equal(q.dequantize().view(np.uint32), theirs[name].view(np.uint32)), (what, name)
    assert accepted > 30 and refused > 150


# ============================================================================ exmyconv CLI

def _cli() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "exmyconv")
    return exe if os.path.exists(exe) else shutil.which("exmyconv")


def quantize(model: str, out: str, *args: str) -> None:
    cmd = [_cli(), "quantize", *args, model, out]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"


MINILM_CASES = {
    # id: (CLI arguments, format, group size, embeddings quantized)
    "e2m2-channel": (["--format", "e2m2"], "e2m2", None, False),
    # sharded output as well, to exercise model.safetensors.index.json
    "e3m2-g64-sharded": (["--format", "e3m2", "--group-size", "64", "--max-shard-size", "10MB"],
                         "e3m2", 64, False),
    "e2m1-g32-emb": (["--format", "e2m1", "--group-size", "32", "--quantize-embeddings"],
                     "e2m1", 32, True),
    # mantissa-shared formats (layout 1.1)
    "e2m2s4-channel": (["--format", "e2m2s4"], "e2m2s4", None, False),
    "e2m3s3-g64": (["--format", "e2m3s3", "--group-size", "64"], "e2m3s3", 64, False),
}
SHARED_MINILM = ["e2m2s4-channel", "e2m3s3-g64"]


class Converted:
    def __init__(self, out_dir: str):
        self.dir = out_dir
        self.ckpt = sd.read_checkpoint(out_dir)
        self.f32 = {n: q.dequantize() for n, q in self.ckpt.quantized.items()}


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    cache = {}

    def get(case: str) -> Converted:
        if case not in cache:
            out = str(tmp_path_factory.mktemp("minilm") / case)
            quantize("@minilm", out, *MINILM_CASES[case][0])
            cache[case] = Converted(out)
        return cache[case]

    return get


def compare_with_exmyconv(conv: Converted, dtype: torch.dtype) -> None:
    ref = load_state_dict(conv.dir, dtype=dtype)
    ck = conv.ckpt
    assert set(ref) == set(ck.quantized) | set(ck.plain)
    out = ST_DTYPE[dtype]
    for name, q in ck.quantized.items():
        t = ref[name]
        assert t.dtype == dtype and list(t.shape) == q.shape, name
        v = conv.f32[name]
        mine = {"F32": lambda: v.view(np.uint32), "F16": lambda: sd.f32_to_f16_bits(v),
                "BF16": lambda: sd.f32_to_bf16_bits(v)}[out]()
        theirs = torch_bits(t)
        mism = np.flatnonzero(mine.ravel() != theirs.ravel())
        assert mism.size == 0, f"{name} ({out}): {mism.size} mismatches, first at {mism[:5].tolist()}"
    for name, p in ck.plain.items():
        t = ref[name]
        # load_state_dict keeps unquantized tensors as stored, whatever dtype is asked for
        assert ST_DTYPE[t.dtype] == p.dtype and list(t.shape) == list(p.data.shape), name
        theirs = torch_bits(t) if t.is_floating_point() else t.contiguous().numpy()
        # byte-for-byte (bit patterns, so -0.0 and NaN payloads count)
        assert np.array_equal(np.ascontiguousarray(theirs).reshape(-1).view(np.uint8),
                              np.ascontiguousarray(p.data).reshape(-1).view(np.uint8)), name


@pytest.mark.parametrize("case", sorted(MINILM_CASES))
def test_minilm_layout(minilm, case):
    args, fmt, group, emb = MINILM_CASES[case]
    conv = minilm(case)
    ck = conv.ckpt
    with open(os.path.join(conv.dir, "config.json")) as fh:
        config = json.load(fh)
    qc = config["quantization_config"]
    assert qc["quant_method"] == "exmy" and qc["format_version"] == "2.0"
    assert qc["format"] == fmt and qc["group_size"] == group
    assert isinstance(qc["exmyconv_version"], str) and qc["exmyconv_version"]
    assert config["model_type"] == "bert" and config["hidden_size"] == 384   # source config kept
    # "ignore lists source weights with >= 2 dimensions that were kept unquantized"
    kept_2d = sorted(n for n, p in ck.plain.items() if p.data.ndim >= 2)
    assert sorted(qc["ignore"]) == kept_2d
    assert ("embeddings.word_embeddings.weight" in ck.quantized) == emb
    assert len(ck.quantized) >= 36
    for name, q in ck.quantized.items():
        assert q.format == fmt and q.source_dtype == "F32" and len(q.shape) == 2
        assert q.group_size == (group or q.shape[-1])
        assert isinstance(q.info["rel_error"], float) and 0 <= q.info["rel_error"] < 1
        check_scales(q)
        check_padding(q)
        v = conv.f32[name]
        assert np.all(np.isfinite(v)), name
        assert np.all(np.isfinite(sd.f32_to_f16_bits(v).view(np.float16))), name
    for p in ck.plain.values():
        if p.dtype in ("F32", "F16", "BF16"):
            assert np.all(np.isfinite(p.as_f32()))
    for md_file in ck.files:
        md, _ = sd.read_safetensors(md_file)
        assert md["format"] == "pt" and md["exmy_version"] == "2.0"
    index = os.path.join(conv.dir, "model.safetensors.index.json")
    if "--max-shard-size" in args:
        with open(index) as fh:
            idx = json.load(fh)
        assert len(ck.files) > 1
        sizes = {}
        for f in ck.files:
            for n, (_dt, _sh, arr) in sd.read_safetensors(f)[1].items():
                sizes[n] = arr.nbytes
                assert idx["weight_map"][n] == os.path.basename(f)
        assert set(idx["weight_map"]) == set(sizes)
        assert idx["metadata"]["total_size"] == sum(sizes.values())
    else:
        assert not os.path.exists(index) and ck.files == [os.path.join(conv.dir, "model.safetensors")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(MINILM_CASES))
def test_minilm_matches_exmyconv(minilm, case, dtype):
    compare_with_exmyconv(minilm(case), dtype)


@pytest.mark.parametrize("case", SHARED_MINILM)
def test_minilm_shared_bit(minilm, case):
    """The codes behind load_state_dict's float32 values, recovered from the values alone, equal
    ours, and every k consecutive elements of each row (from the row start; the last group
    only on its real elements) share m0."""
    conv = minilm(case)
    _args, fmt, group, _emb = MINILM_CASES[case]
    _E, _M, k = sd.parse_format_full(fmt)
    ref = load_state_dict(conv.dir, dtype=torch.float32)
    straddling = 0
    for name, q in conv.ckpt.quantized.items():
        v = ref[name].contiguous().numpy()
        check_shared_codes(q, v, case)
        codes = q.codes()
        check_shared_groups(codes, k, f"{case} {name} (our decoding)")
        K, G = q.shape[-1], q.group_size
        if G % k:
            # share groups run across scale-group boundaries (64 = 3*21 + 1): groups counted
            # from each scale group's start instead would not share m0
            straddling += 1
            assert not all(shared_groups_hold(codes, k, j, min(j + G, K)) for j in range(G, K, G)), name
    assert straddling == (len(conv.ckpt.quantized) if group and group % k else 0)


# bits per element of one row: SPEC.md section 1's nominal b - 1 + 1/k, and the exact
# row_bytes of section 3 for MiniLM's K (hidden 384, intermediate 1536)
SHARED_ROW_BYTES = {("e2m2s4", 384): 204, ("e2m2s4", 1536): 816,
                    ("e2m3s3", 384): 256, ("e2m3s3", 1536): 1024}
SPEC_BPW = {"e2m2s4": 4.25, "e2m3s3": 5.33}    # as printed in SPEC.md section 1


@pytest.mark.parametrize("case", SHARED_MINILM)
def test_minilm_shared_bits_per_weight(minilm, case):
    conv = minilm(case)
    fmt = MINILM_CASES[case][1]
    E, M, k = sd.parse_format_full(fmt)
    b = 1 + E + M
    nominal = b - 1 + 1 / k
    assert round(nominal, 2) == SPEC_BPW[fmt]
    seen = set()
    for name, q in conv.ckpt.quantized.items():
        K = q.shape[-1]
        Kp = sd.padded_length(K)
        rb = q.packed.shape[-1]
        seen.add(K)
        assert rb == sd.row_bytes(K, b, k) == SHARED_ROW_BYTES[(fmt, K)], name
        # payload bits beyond the nominal: (b-1)*(Kp-K) for the padded codes, < (Kp-K)/k + 1
        # for the shared bits of padding and the last short group, < 32 for the shared plane's
        # padding to 4 bytes
        over = 8 * rb - nominal * K
        assert 0 <= over < (b - 1 + 1 / k) * (Kp - K) + 1 + 32, name
        assert q.packed.size * 8 / math.prod(q.shape[:-1]) == 8 * rb
    assert seen == {384, 1536}
    bpw = {K: 8 * SHARED_ROW_BYTES[(fmt, K)] / K for K in seen}
    if fmt == "e2m3s3":   # 384/3 = 128 and 1536/3 = 512 shared bits fill whole 4-byte words
        assert bpw == {384: 16 / 3, 1536: 16 / 3}
    else:                 # 384/4 = 96 and 1536/4 = 384 shared bits fill whole words: exactly 4.25
        assert bpw == {384: 4.25, 1536: 4.25}


# ============================================================================ odd shapes / formats

def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    header, blobs, off = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, (dtype, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A tiny HF-style checkpoint with the shapes and value ranges the spec talks about."""
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("small") / "src"
    d.mkdir()
    a = rng.standard_normal((5, 200)).astype(np.float32)
    a[2] = 0                                                     # zero row: smallest-normal scale
    a[4, :3] = [-0.0, 0.0, -1e-30]                               # -0 and values that round to -0
    big = rng.standard_normal((4, 64)).astype(np.float32)
    big[1] *= 1e5                                                # needs bf16 scales; fp16 overflows
    experts = rng.standard_normal((3, 5, 40)).astype(np.float16)  # 3-D, K < 128
    bf = rng.standard_normal((64, 130)).astype(ml_dtypes.bfloat16).view(np.uint16)
    write_safetensors(str(d / "model.safetensors"), {
        "model.layers.0.mlp.up_proj.weight": ("F32", a),
        "model.layers.0.mlp.down_proj.weight": ("F32", big),
        "model.layers.0.mlp.experts.weight": ("F16", experts),
        "model.layers.0.self_attn.o_proj.weight": ("BF16", bf),
        "model.norm.weight": ("F32", np.linspace(0.5, 1.5, 64, dtype=np.float32)),
    })
    with open(d / "config.json", "w") as fh:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, fh)
    return str(d)


# b = 2 ... 8, M = 0 included (the published vectors have no b = 2 and no M = 0 case)
SMALL_CASES = [("e1m0", "48"), ("e2m0", None), ("e3m0", "32"), ("e5m0", "48"),
               # shared formats: every per-element plane split b - 1 = 2 ... 7, k = 2 ... 8
               ("e1m1s2", None), ("e2m1s8", "48"), ("e2m2s4", None), ("e2m3s3", "32"),
               ("e3m2s5", "48"), ("e1m5s7", None), ("e2m4s6", "64"), ("e5m2s6", None),
               ("e4m3s8", "48"),
               ("e1m5", None), ("e4m2", "48"), ("e2m5", "64"), ("e5m2", "48")]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # fp16 output of the 1e5 row
@pytest.mark.parametrize("fmt, group", SMALL_CASES)
def test_small_model_matches_exmyconv(small_model, tmp_path, fmt, group):
    out = str(tmp_path / "out")
    quantize(small_model, out, "--format", fmt, *(["--group-size", group] if group else []))
    conv = Converted(out)
    ck = conv.ckpt
    assert set(ck.plain) == {"model.norm.weight"} and len(ck.quantized) == 4
    srcs = {"model.layers.0.mlp.up_proj.weight": "F32", "model.layers.0.mlp.down_proj.weight": "F32",
            "model.layers.0.mlp.experts.weight": "F16", "model.layers.0.self_attn.o_proj.weight": "BF16"}
    for name, q in ck.quantized.items():
        assert q.format == fmt and q.source_dtype == srcs[name]
        assert q.group_size == min(int(group or q.shape[-1]), q.shape[-1])
        check_scales(q)
        check_padding(q)
        assert np.all(np.isfinite(conv.f32[name]))
    assert ck.quantized["model.layers.0.mlp.down_proj.weight"].scale_dtype == "BF16"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        compare_with_exmyconv(conv, dtype)
    if sd.parse_format_full(fmt)[2] is not None:
        ref = load_state_dict(out, dtype=torch.float32)
        for name, q in ck.quantized.items():
            check_shared_codes(q, ref[name].contiguous().numpy(), fmt)


# ============================================================================ versions

def rewrite_vector(src: str, dst: str, version: str | None = None, fmt: str | None = None) -> None:
    """Copy a vector file, changing its exmy_version and/or every tensor's format name."""
    md, tensors = sd.read_safetensors(src)
    md = dict(md)
    if version is not None:
        md["exmy_version"] = version
    if fmt is not None:
        for key in [k for k in md if k.startswith("exmy:")]:
            info = json.loads(md[key])
            info["format"] = fmt
            md[key] = json.dumps(info)
    write_safetensors(dst, {n: (dt, arr) for n, (dt, _sh, arr) in tensors.items()}, md)


def _bits(ckpt: sd.Checkpoint) -> dict:
    return {n: q.dequantize().view(np.uint32) for n, q in ckpt.quantized.items()}


def test_layout_versions(tmp_path):
    """SPEC.md section 5: a 2.x reader reads later 2.x minors and 1.x files (1.0 without shared
    formats) by their own padding, refuses other majors, and refuses a format name it does not know
    with a clear message."""
    plain = os.path.join(VECTORS, "e2m2.safetensors")
    shared = os.path.join(VECTORS, "e2m2s4.safetensors")
    want = _bits(sd.read_file(plain))
    for v, src in [("2.0", plain), ("2.5", plain)] + [(v, os.path.join(VECTORS, "v1", "e2m2.safetensors"))
                                                     for v in ("1.0", "1.1", "1.2", "1.7")]:
        rewrite_vector(src, str(tmp_path / "p.safetensors"), version=v)
        ck = sd.read_file(str(tmp_path / "p.safetensors"))
        assert ck.metadata["exmy_version"] == v
        got = _bits(ck)
        assert all(np.array_equal(got[n], want[n]) for n in want)
    # the padding is the version's: a 2.0 payload in a file that says 1.2 (and the reverse) is refused
    rewrite_vector(plain, str(tmp_path / "p.safetensors"), version="1.2")
    with pytest.raises(ValueError, match="packed"):
        sd.read_file(str(tmp_path / "p.safetensors"))
    rewrite_vector(shared, str(tmp_path / "s.safetensors"), version="2.1")
    assert sd.read_file(str(tmp_path / "s.safetensors")).quantized
    for v in ("3.0", "0.9", "2", "x"):
        rewrite_vector(plain, str(tmp_path / "bad.safetensors"), version=v)
        with pytest.raises(ValueError, match="version"):
            sd.read_file(str(tmp_path / "bad.safetensors"))
    shared_v1 = os.path.join(VECTORS, "v1", "e2m2s4.safetensors")
    rewrite_vector(shared_v1, str(tmp_path / "r.safetensors"), version="1.0")  # shared format in a 1.0 file
    with pytest.raises(ValueError, match="needs 1.1"):
        sd.read_file(str(tmp_path / "r.safetensors"))
    refused = [  # (rewrite of the shared vector, expected message)
        # unknown format names, e.g. a share count this reader does not know
        *((dict(fmt=f), "unknown format") for f in ("e2m2s9", "e2m2s1", "e2m0s2", "e2m2x4")),
        (dict(fmt="e2m2"), "packed"),  # the shared payload is shorter than e2m2's
    ]
    for change, message in refused:
        rewrite_vector(shared, str(tmp_path / "r.safetensors"), **change)
        with pytest.raises(ValueError, match=message):
            sd.read_file(str(tmp_path / "r.safetensors"))
