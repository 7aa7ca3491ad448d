"""Safetensors dtype names <-> numpy, with bf16 handled as raw uint16 bits (numpy has no bf16)."""
from __future__ import annotations

import numpy as np

# safetensors dtype -> (numpy storage dtype, bytes per element)
STORAGE = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype("u1"),  # OCP float8 e4m3 (E4M3FN); here only as 8-bit scales, kept as raw bytes
}
FLOAT = ("F64", "F32", "F16", "BF16")
E4M3_MAX = 448.0  # largest finite OCP e4m3 value (code 0x7E; 0x7F is NaN there)
E4M3_MIN = 2.0 ** -9  # smallest positive (code 0x01)


def _e4m3():
    from .exmy import get_format  # our e4m3 has the same codes and values below 480 (0x7F is 480 here)

    return get_format("e4m3")


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of a float safetensors dtype -> float32 (exact for F16/BF16)."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E4M3":
        return _e4m3().decode(array).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # signalling NaNs stay NaN, F64 beyond range is inf
        return array.astype(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, round to nearest even (inputs are finite)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded (nearest even) to fp16/bf16 and returned as float32."""
    if dtype == "F16":
        with np.errstate(over="ignore"):  # beyond fp16's range: +-inf, as SPEC section 2 says
            return x.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        return to_float32(bf16_bits(x), "BF16")
    if dtype == "F32":
        return x.astype(np.float32)
    if dtype == "F8_E4M3":  # positive finite values only (scales): nearest even, within [E4M3_MIN, E4M3_MAX]
        return _e4m3().decode(_e4m3().encode(np.clip(x, E4M3_MIN, E4M3_MAX))).astype(np.float32)
    raise ValueError(f"cannot round to {dtype}")


def store(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the numpy array safetensors stores for dtype F32/F16/BF16 (F8_E4M3: scales)."""
    if dtype == "BF16":
        return bf16_bits(x)
    if dtype == "F8_E4M3":  # values already exact e4m3 numbers in [E4M3_MIN, E4M3_MAX]
        return _e4m3().encode(x)
    with np.errstate(over="ignore"):  # beyond fp16's range: +-inf, as SPEC section 2 says
        return x.astype(STORAGE[dtype])
