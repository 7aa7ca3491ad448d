"""Bit-plane packing (SPEC section 3): round trips, sizes, padding and the literal byte layout."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import spec_pack, spec_unpack
from exmyconv.format import exmy as formats
from exmyconv.format import pack

ALL = formats.all_formats()


@st.composite
def code_arrays(draw):
    fmt = draw(st.sampled_from(ALL))
    k = draw(st.integers(1, 600))
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    seed = draw(st.integers(0, 2**63 - 1))
    shape = (*lead, k) if lead else (1, k)
    codes = np.random.default_rng(seed).integers(0, 2**fmt.bits, shape, dtype=np.uint8)
    return fmt, codes


@settings(max_examples=500, deadline=None)
@given(code_arrays())
def test_pack_unpack_round_trip_and_layout(case):
    fmt, codes = case
    *lead, k = codes.shape
    kp = 32 * -(-k // 32)
    payload = pack.pack_codes(codes, fmt)
    assert payload.dtype == np.uint8
    assert payload.shape == (*lead, kp * fmt.bits // 8) == (*lead, pack.row_bytes(fmt, k))
    assert np.array_equal(pack.unpack_codes(payload, fmt, k), codes)
    # byte for byte what SPEC section 3 says, and decodable by a spec-only reader
    assert np.array_equal(payload, spec_pack(codes, fmt.bits))
    decoded = spec_unpack(payload, fmt.bits, k)
    assert np.array_equal(decoded[..., :k], codes)
    assert not decoded[..., k:].any(), "padding codes must be 0"


@pytest.mark.parametrize("fmt", ALL, ids=[f.name for f in ALL])
@pytest.mark.parametrize("k", [1, 3, 31, 32, 33, 127, 128, 129, 256, 300, 576, 600])
def test_payload_size_per_row(fmt, k):
    assert pack.padded_k(k) == 32 * -(-k // 32)
    nbytes = 32 * -(-k // 32) * fmt.bits // 8
    assert pack.row_bytes(fmt, k) == nbytes
    assert nbytes % 4 == 0  # every plane row a whole number of 32-bit words
    codes = np.full((2, k), 2**fmt.bits - 1, dtype=np.uint8)  # all ones: padding must still be 0
    payload = pack.pack_codes(codes, fmt)
    assert payload.shape == (2, nbytes)
    full = pack.unpack_codes(payload, fmt, pack.padded_k(k))
    assert np.all(full[:, :k] == 2**fmt.bits - 1) and not full[:, k:].any()
    # each plane of width w holds exactly Kp*w/8 bytes; the padded tail bits of every plane are 0
    offset = 0
    for w in fmt.planes:
        size = pack.padded_k(k) * w // 8
        plane = payload[:, offset:offset + size]
        bits = np.unpackbits(plane, axis=-1, bitorder="little")
        assert bits[:, :k * w].all() and not bits[:, k * w:].any()
        offset += size
    assert offset == nbytes


def test_literal_layout_e2m2_k3():
    """e2m2 (5 bits = 4-bit plane [s e1 e0 m1] + 1-bit plane [m0]), K = 3, computed by hand."""
    fmt = formats.get_format("e2m2")
    codes = np.array([[0b10110, 0b00011, 0b11111]], dtype=np.uint8)  # -1.5, 0.75, -7
    assert fmt.decode(codes).tolist() == [[-1.5, 0.75, -7.0]]
    # 4-bit fields: 0b1011=11, 0b0001=1, 0b1111=15 -> byte0 = 11 | 1<<4 = 0x1B, byte1 = 0x0F
    # 1-bit fields: 0, 1, 1 -> byte 16 = 0b110 = 0x06
    want = np.zeros(20, dtype=np.uint8)  # Kp=32: 16 bytes + 4 bytes
    want[0], want[1], want[16] = 0x1B, 0x0F, 0x06
    got = pack.pack_codes(codes, fmt)
    assert got.shape == (1, 20)
    assert got[0].tolist() == want.tolist()
    assert pack.unpack_codes(want[None], fmt, 3).tolist() == codes.tolist()


def test_literal_layout_e3m3_two_rows():
    """7 bits = planes 4 + 2 + 1 (28 bytes per row for K <= 32), rows one after another."""
    fmt = formats.get_format("e3m3")
    codes = np.array([[0b1011011, 0b0000110], [0b0100101, 0b1111111]], dtype=np.uint8)
    want = np.zeros((2, 28), dtype=np.uint8)
    # row 0: 4-bit fields 0b1011=11, 0b0000=0 -> byte0 = 0x0B; 2-bit fields 0b01, 0b11 -> byte16 =
    # 1 | 3<<2 = 0x0D; 1-bit fields 1, 0 -> byte24 = 0x01
    want[0, 0], want[0, 16], want[0, 24] = 0x0B, 0x0D, 0x01
    # row 1: 4-bit 0b0100=4, 0b1111=15 -> 0xF4; 2-bit 0b10, 0b11 -> 2 | 3<<2 = 0x0E; 1-bit 1, 1 -> 0x03
    want[1, 0], want[1, 16], want[1, 24] = 0xF4, 0x0E, 0x03
    assert pack.pack_codes(codes, fmt).tolist() == want.tolist()
    assert pack.unpack_codes(want, fmt, 2).tolist() == codes.tolist()


def test_literal_layout_two_bit_and_eight_bit_planes():
    e1m0 = formats.get_format("e1m0")  # 2 bits: one 2-bit plane, 4 fields per byte, first lowest
    got = pack.pack_codes(np.array([[1, 2, 3, 0, 3]], dtype=np.uint8), e1m0)
    assert got.shape == (1, 8)
    assert got[0, :2].tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6, 3] and not got[0, 2:].any()
    e4m3 = formats.get_format("e4m3")  # 8 bits: the codes themselves
    got = pack.pack_codes(np.array([[0x7F, 0x80, 0x01]], dtype=np.uint8), e4m3)
    assert got.shape == (1, 32) and got[0, :3].tolist() == [0x7F, 0x80, 0x01] and not got[0, 3:].any()
    e2m1 = formats.get_format("e2m1")  # 4 bits: even element in the low nibble
    got = pack.pack_codes(np.array([[0x1, 0xA, 0xF]], dtype=np.uint8), e2m1)
    assert got.shape == (1, 16) and got[0, :2].tolist() == [0xA1, 0x0F] and not got[0, 2:].any()
    e1m1 = formats.get_format("e1m1")  # 3 bits: 2-bit plane (8 bytes) then 1-bit plane (4 bytes)
    got = pack.pack_codes(np.array([[0b101, 0b011]], dtype=np.uint8), e1m1)
    assert got.shape == (1, 12)
    assert got[0, 0] == (0b10 | 0b01 << 2) and got[0, 8] == (1 | 1 << 1)
    assert not got[0, 1:8].any() and not got[0, 9:].any()


def test_leading_dimensions_are_rows_in_c_order(rng):
    fmt = formats.get_format("e3m2")
    codes = rng.integers(0, 64, (3, 4, 200), dtype=np.uint8)
    payload = pack.pack_codes(codes, fmt)
    assert payload.shape == (3, 4, pack.row_bytes(fmt, 200))
    flat = pack.pack_codes(codes.reshape(12, 200), fmt)
    assert np.array_equal(payload.reshape(12, -1), flat)
    assert np.array_equal(pack.unpack_codes(payload, fmt, 200), codes)


def test_unpack_rejects_wrong_row_size():
    fmt = formats.get_format("e2m2")
    with pytest.raises(ValueError):
        pack.unpack_codes(np.zeros((2, 19), np.uint8), fmt, 3)
    with pytest.raises(ValueError):
        pack.unpack_codes(np.zeros((2, 80), np.uint8), fmt, 129)  # 129 needs Kp = 160: 100 bytes


def _v1_pack(codes: np.ndarray, fmt) -> np.ndarray:
    """Layout 1.x bytes (SPEC 1.2 section 3: rows padded to 128 elements, the shared plane to 16 bytes),
    written from that text alone: the oracle for reading old checkpoints."""
    *lead, k = codes.shape
    kp = 128 * -(-k // 128)
    own = codes >> 1 if fmt.share > 1 else codes
    planes = spec_pack(own, fmt.own_bits, align=128) if fmt.own_bits else np.zeros((*lead, 0), np.uint8)
    if fmt.share == 1:
        return planes
    padded = np.zeros((*lead, kp), np.uint8)
    padded[..., :k] = codes
    bits = padded[..., ::fmt.share] & 1
    shared = np.zeros((*lead, 16 * -(-bits.shape[-1] // 128)), np.uint8)
    for j in range(bits.shape[-1]):
        shared[..., j // 8] |= bits[..., j] << (j % 8)
    return np.concatenate([planes, shared], axis=-1)


@settings(max_examples=300, deadline=None)
@given(code_arrays())
def test_upgrade_reads_layout_1_rows(case):
    """1.x payloads (rows padded to 128) become the 2.0 bytes of the same codes; same bytes -> no copy."""
    fmt, codes = case
    if fmt.share > 1:  # the shared bit is one per share block: give every block one value
        blocks = np.repeat(codes[..., ::fmt.share] & 1, fmt.share, axis=-1)[..., :codes.shape[-1]]
        codes = (codes & 0xFE) | blocks
    *lead, k = codes.shape
    old = _v1_pack(codes, fmt)
    assert old.shape[-1] == pack.row_bytes(fmt, k, layout=1)
    new = pack.upgrade(old, fmt, k, layout=1)
    assert np.array_equal(new, pack.pack_codes(codes, fmt))
    if old.shape[-1] == new.shape[-1]:
        assert new is old


@pytest.mark.parametrize("name,k", [("e2m2", 576), ("e2m2s4", 576), ("e2m3s3", 576), ("e2m1", 576),
                                    ("e3m2", 576), ("e2m2", 4096), ("e2m3s3", 4096)])
def test_padding_costs_at_most_005_bit(name, k):
    """Issue 20's padding target: a row costs at most 0.05 bit per weight above its nominal bits."""
    fmt = formats.get_format(name)
    assert pack.row_bytes(fmt, k) * 8 / k - fmt.bits_per_weight <= 0.05
