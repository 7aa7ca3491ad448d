"""Bit-plane packing of ExMy codes (formats/SPEC.md section 3).

Each row's codes are padded to Kp = 128*ceil(K/128) and cut into planes of 8, 4, 2 and 1 bits
(the binary digits of the code width, widest plane = most significant bits). A w-bit plane holds
element i at bit i*w, little-endian; a row's payload is its planes concatenated.
"""
from __future__ import annotations

import numpy as np

from .formats import ExMy

ROW_ALIGN = 128  # elements; makes every plane row a multiple of 16 bytes


def padded_k(k: int) -> int:
    return -(-k // ROW_ALIGN) * ROW_ALIGN


def row_bytes(fmt: ExMy, k: int) -> int:
    return padded_k(k) * fmt.bits // 8


def _plane_shifts(fmt: ExMy):
    """(width, shift) per plane: the plane holds (code >> shift) & (2^width - 1)."""
    shift = fmt.bits
    for w in fmt.planes:
        shift -= w
        yield w, shift


def pack_codes(codes: np.ndarray, fmt: ExMy) -> np.ndarray:
    """uint8 codes [..., K] -> uint8 payload [..., row_bytes]."""
    *lead, k = codes.shape
    kp = padded_k(k)
    padded = np.zeros((*lead, kp), dtype=np.uint8)
    padded[..., :k] = codes
    planes = []
    for w, shift in _plane_shifts(fmt):
        field = (padded >> shift) & ((1 << w) - 1) if w < 8 else padded
        per_byte = 8 // w
        field = field.reshape(*lead, kp // per_byte, per_byte)
        packed = field[..., 0].copy()
        for j in range(1, per_byte):
            packed |= field[..., j] << (w * j)
        planes.append(packed)
    return np.concatenate(planes, axis=-1)


def unpack_codes(payload: np.ndarray, fmt: ExMy, k: int) -> np.ndarray:
    """uint8 payload [..., row_bytes] -> uint8 codes [..., K]."""
    *lead, nbytes = payload.shape
    kp = padded_k(k)
    if nbytes != kp * fmt.bits // 8:
        raise ValueError(f"payload rows have {nbytes} bytes, expected {kp * fmt.bits // 8}")
    codes = np.zeros((*lead, kp), dtype=np.uint8)
    offset = 0
    for w, shift in _plane_shifts(fmt):
        size = kp * w // 8
        plane = payload[..., offset:offset + size]
        offset += size
        per_byte = 8 // w
        fields = np.empty((*lead, size, per_byte), dtype=np.uint8)
        for j in range(per_byte):
            fields[..., j] = (plane >> (w * j)) & ((1 << w) - 1)
        codes |= fields.reshape(*lead, kp) << shift
    return codes[..., :k]
