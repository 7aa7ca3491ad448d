"""Bit-plane packing of ExMy codes (formats/SPEC.md section 3).

Each row's codes are padded to Kp = 32*ceil(K/32) and cut into planes of 8, 4, 2 and 1 bits
(the binary digits of the code width, widest plane = most significant bits). A w-bit plane holds
element i at bit i*w, little-endian; a row's payload is its planes concatenated. Shared formats
store the code without its last bit that way, then one bit per share block of k elements, the
shared plane padded to whole 32-bit words.

Layout 1.x padded rows to 128 elements and the shared plane to 16 bytes; those files are read
through :func:`upgrade`, which drops the extra padding bytes (nothing else differs).
"""
from __future__ import annotations

import numpy as np

from .exmy import ExMy

LAYOUT = 2  # major layout version whose row padding the functions below use by default
ROW_ALIGN = {1: 128, 2: 32}  # elements per padded row unit: 32 = one chunk of the GPU kernels
SHARED_ALIGN = {1: 16, 2: 4}  # bytes the shared plane of a row is padded to


def padded_k(k: int, layout: int = LAYOUT) -> int:
    align = ROW_ALIGN[layout]
    return -(-k // align) * align


def shared_plane_bytes(fmt: ExMy, k: int, layout: int = LAYOUT) -> int:
    """Bytes of the shared-bit plane of a row: ceil(Kp/share) bits, padded to SHARED_ALIGN bytes."""
    if fmt.share == 1:
        return 0
    bits = -(-padded_k(k, layout) // fmt.share)
    unit = 8 * SHARED_ALIGN[layout]
    return SHARED_ALIGN[layout] * -(-bits // unit)


def row_bytes(fmt: ExMy, k: int, layout: int = LAYOUT) -> int:
    return padded_k(k, layout) * fmt.own_bits // 8 + shared_plane_bytes(fmt, k, layout)


def upgrade(payload, fmt: ExMy, k: int, layout: int):
    """A payload [..., row_bytes(fmt, k, layout)] of an older layout -> the same rows in the current
    layout (numpy array or torch tensor; returned as is when the bytes are the same). Only padding
    differs between layouts: each plane loses the bytes of its padding elements past the new Kp
    (they hold code 0), the shared plane its bits past ceil(Kp/share) (0 as well)."""
    if layout == LAYOUT or row_bytes(fmt, k, layout) == row_bytes(fmt, k):
        return payload
    old, new = padded_k(k, layout), padded_k(k)
    parts, offset = [], 0
    for w in fmt.planes:
        parts.append(payload[..., offset:offset + new * w // 8])
        offset += old * w // 8
    if fmt.share > 1:
        parts.append(payload[..., offset:offset + shared_plane_bytes(fmt, k)])
    if hasattr(payload, "new_empty"):  # torch
        import torch
        return torch.cat(parts, dim=-1)
    return np.concatenate(parts, axis=-1)


def plane_shifts(fmt: ExMy):
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
    for w, shift in plane_shifts(fmt):
        field = (padded >> shift) & ((1 << w) - 1) if w < 8 else padded
        per_byte = 8 // w
        field = field.reshape(*lead, kp // per_byte, per_byte)
        packed = field[..., 0].copy()
        for j in range(1, per_byte):
            packed |= field[..., j] << (w * j)
        planes.append(packed)
    if fmt.share > 1:  # the last bit of each group's first element (all of the group share it)
        bits = padded[..., ::fmt.share] & 1
        shared = np.packbits(bits, axis=-1, bitorder="little")
        extra = shared_plane_bytes(fmt, k) - shared.shape[-1]
        planes.append(np.concatenate([shared, np.zeros((*lead, extra), np.uint8)], axis=-1))
    return np.concatenate(planes, axis=-1)


def unpack_codes(payload: np.ndarray, fmt: ExMy, k: int) -> np.ndarray:
    """uint8 payload [..., row_bytes] -> uint8 codes [..., K]."""
    *lead, nbytes = payload.shape
    kp = padded_k(k)
    if nbytes != row_bytes(fmt, k):
        raise ValueError(f"payload rows have {nbytes} bytes, expected {row_bytes(fmt, k)}")
    codes = np.zeros((*lead, kp), dtype=np.uint8)
    offset = 0
    for w, shift in plane_shifts(fmt):
        size = kp * w // 8
        plane = payload[..., offset:offset + size]
        offset += size
        per_byte = 8 // w
        fields = np.empty((*lead, size, per_byte), dtype=np.uint8)
        for j in range(per_byte):
            fields[..., j] = (plane >> (w * j)) & ((1 << w) - 1)
        codes |= fields.reshape(*lead, kp) << shift
    if fmt.share > 1:
        plane = payload[..., offset:]
        bits = np.unpackbits(plane, axis=-1, bitorder="little")
        codes |= np.repeat(bits, fmt.share, axis=-1)[..., :kp]
    return codes[..., :k]
