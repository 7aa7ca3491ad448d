"""Safetensors dtype names <-> numpy, with bf16 handled as raw uint16 bits (numpy has no bf16)."""
from __future__ import annotations

import numpy as np

# safetensors dtype -> (numpy storage dtype, bytes per element)
STORAGE = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT = ("F64", "F32", "F16", "BF16")


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of a float safetensors dtype -> float32 (exact for F16/BF16)."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
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
    raise ValueError(f"cannot round to {dtype}")


def store(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the numpy array safetensors stores for dtype F32/F16/BF16."""
    if dtype == "BF16":
        return bf16_bits(x)
    with np.errstate(over="ignore"):  # beyond fp16's range: +-inf, as SPEC section 2 says
        return x.astype(STORAGE[dtype])
