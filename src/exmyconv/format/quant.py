"""Reference quantizer and dequantizer (formats/SPEC.md section 2), numpy, float32.

Rows are the leading dimensions of a weight, K its last; groups of G consecutive elements of a
row share one scale. The scale dtype is chosen per tensor (fp16 when it is safe, else bf16), or
8-bit scales are asked for: e4m3 group scales times a power of two per tensor, 2^scale_exp. Those
are quantized here in the tensor's own units x * 2^-scale_exp (exact), where the scales are plain
e4m3 numbers ("F8_E4M3"); :func:`scale_exponent` picks the power.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import dtypes
from .exmy import ExMy
from .pack import pack_codes, unpack_codes

FP16_MAX = 65504.0
SMALLEST_NORMAL = {"F16": 2.0**-14, "BF16": 2.0**-126, "F8_E4M3": dtypes.E4M3_MIN}  # (e4m3: smallest positive)
SCALE_EXP_RANGE = (-100, 100)  # 8-bit scales: the tensor's power of two (SPEC section 2)
CLIP_RATIOS = np.linspace(1.0, 0.5, 11, dtype=np.float32)


def groups_of(k: int, group_size: int | None) -> tuple[int, int]:
    """(G, number of groups) for a row of k elements; None means one group per row."""
    g = k if not group_size or group_size >= k else group_size
    return g, -(-k // g)


def _grouped(x: np.ndarray, g: int, ngroups: int) -> np.ndarray:
    """[R, K] -> [R, ngroups, g], zero-padding a short last group (zeros encode as code 0)."""
    rows, k = x.shape
    if ngroups * g != k:
        x = np.pad(x, ((0, 0), (0, ngroups * g - k)))
    return x.reshape(rows, ngroups, g)


def group_amax(x: np.ndarray, g: int, ngroups: int) -> np.ndarray:
    return np.abs(_grouped(x, g, ngroups)).max(axis=-1)


def choose_scale_dtype(amax: np.ndarray, fmt: ExMy) -> str:
    """fp16 when every nonzero group's scale is an fp16 normal with scale*max <= 65504."""
    with np.errstate(over="ignore"):  # too large for fp16 -> inf -> does not fit
        s = (amax[amax > 0] / np.float32(fmt.max)).astype(np.float16).astype(np.float32)
    fits = np.all(s >= SMALLEST_NORMAL["F16"]) and np.all(s * np.float32(fmt.max) <= FP16_MAX)
    return "F16" if fits else "BF16"


def scale_exponent(amax: np.ndarray, fmt: ExMy) -> int:
    """8-bit scales: the tensor's power of two t, the smallest that puts its largest group scale
    amax / max at or below e4m3's largest value (448) once divided by 2^t."""
    top = float(np.max(amax, initial=0.0)) / fmt.max
    if top <= 0:
        return 0
    t = int(np.ceil(np.log2(top / dtypes.E4M3_MAX)))
    while top / 2.0**t > dtypes.E4M3_MAX:  # (log2 rounding)
        t += 1
    return int(np.clip(t, *SCALE_EXP_RANGE))


def wide_scale_dtype(values: np.ndarray, fmt: ExMy) -> str:
    """The 16-bit dtype that holds 8-bit scale values (e4m3 times a power of two: 4 significant bits)
    exactly, by choose_scale_dtype's rule: fp16 where every value is an fp16 normal number with
    value * max <= 65504, else bf16."""
    return choose_scale_dtype(values * np.float32(fmt.max), fmt)


def scales_for(amax: np.ndarray, fmt: ExMy, scale_dtype: str) -> np.ndarray:
    """Stored scale values (float32, exact in scale_dtype), never zero or subnormal."""
    s = dtypes.round_to(amax.astype(np.float32) / np.float32(fmt.max), scale_dtype)
    with np.errstate(over="ignore"):
        overflow = np.isinf(s * np.float32(fmt.max))
    if overflow.any():  # weights near the float32 limit: round those scales down instead
        s[overflow] = dtypes.to_float32(dtypes.bf16_bits(s[overflow]) - 1, "BF16")
    return np.maximum(s, np.float32(SMALLEST_NORMAL[scale_dtype]))


def encode_groups(x: np.ndarray, scales: np.ndarray, fmt: ExMy, g: int, importance=None) -> np.ndarray:
    """float32 [R, K] and scales [R, ngroups] -> codes [R, K].

    ``importance`` ([K], optional) weighs each input channel's squared error where the encoder
    has a choice to make (the shared bit of shared formats).
    """
    rows, k = x.shape
    y = (_grouped(x, g, scales.shape[1]) / scales[..., None]).reshape(rows, -1)[:, :k]
    if fmt.share == 1:
        return fmt.encode(y)
    weight = np.square(np.repeat(scales, g, axis=1)[:, :k])  # errors in weight units
    return fmt.encode(y, weight if importance is None else weight * importance)


def _clip_scales(x, amax, fmt, g, scale_dtype, importance=None):
    """Per group, the scale from CLIP_RATIOS with the least (weighted) squared reconstruction error."""
    ngroups = amax.shape[1]
    best_err = best = None
    for ratio in CLIP_RATIOS:
        s = scales_for(amax * ratio, fmt, scale_dtype)
        codes = encode_groups(x, s, fmt, g, importance)
        sq = np.square(dequantize_codes(codes, s, fmt, g) - x)
        if importance is not None:
            sq *= importance
        err = _grouped(sq, g, ngroups).sum(axis=-1)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best = np.where(better, s, best)
            best_err = np.where(better, err, best_err)
    return best


def quantize_rows(x: np.ndarray, fmt: ExMy, g: int, scale_dtype: str, clip_search: bool = False,
                  importance=None):
    """float32 [R, K] -> (codes [R, K] uint8, scales [R, ngroups] float32)."""
    ngroups = -(-x.shape[1] // g)
    amax = group_amax(x, g, ngroups)
    if clip_search:
        scales = _clip_scales(x, amax, fmt, g, scale_dtype, importance)
    else:
        scales = scales_for(amax, fmt, scale_dtype)
    return encode_groups(x, scales, fmt, g, importance), scales


def dequantize_codes(codes: np.ndarray, scales: np.ndarray, fmt: ExMy, g: int) -> np.ndarray:
    """codes [..., K] and scales [..., ngroups] -> float32 [..., K] (exact products)."""
    k = codes.shape[-1]
    if scales.shape[-1] == 1:
        return fmt.decode(codes) * scales
    expanded = np.repeat(scales, g, axis=-1)[..., :k]
    return fmt.decode(codes) * expanded


def squared_error(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, fmt: ExMy, g: int) -> tuple[float, float]:
    """(sum of squared reconstruction errors, sum of squares of x) over float32 [R, K].

    float32 dot products on values scaled by a power of two near 1/max|x|, so that squares of
    weights near the float32 limits neither overflow nor vanish; the sums come back as floats.
    """
    flat = x.reshape(-1)
    amax = float(np.abs(flat).max()) if flat.size else 0.0
    unit = np.float32(2.0 ** int(np.clip(-np.frexp(amax)[1], -126, 126)))
    diff = dequantize_codes(codes, scales, fmt, g).reshape(-1)
    diff -= flat
    diff *= unit
    ref = flat * unit
    return float(np.dot(diff, diff)) / float(unit) ** 2, float(np.dot(ref, ref)) / float(unit) ** 2


@dataclass
class QTensor:
    """A quantized tensor as stored: payload bytes, scales and the parameters to read them."""

    fmt: ExMy
    shape: tuple[int, ...]
    group_size: int
    payload: np.ndarray  # uint8 [..., row_bytes]
    scales: np.ndarray  # float32 [..., ngroups], the scales' values (8-bit: e4m3 value * 2^scale_exp)
    scale_dtype: str  # "F16", "BF16" or "F8_E4M3"
    scale_exp: int = 0  # F8_E4M3: the tensor's power of two

    def dequantize(self, out_dtype: str = "F32") -> np.ndarray:
        """Float32 values rounded to out_dtype (returned as float32 for F32/F16/BF16)."""
        codes = unpack_codes(self.payload, self.fmt, self.shape[-1])
        return dtypes.round_to(dequantize_codes(codes, self.scales, self.fmt, self.group_size), out_dtype)


def quantize(x: np.ndarray, fmt: ExMy, group_size: int | None = None, clip_search: bool = False,
             scales8: bool = False) -> QTensor:
    """Quantize a whole float32 array [..., K] in memory (the pipeline streams instead); ``scales8``:
    e4m3 group scales with a power of two per tensor."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError("need at least 2 dimensions")
    *lead, k = x.shape
    flat = x.reshape(-1, k)
    g, ngroups = groups_of(k, group_size)
    amax = group_amax(flat, g, ngroups)
    t = 0
    if scales8:
        scale_dtype, t = "F8_E4M3", scale_exponent(amax, fmt)
        flat = flat * np.float32(2.0 ** -t)  # (exact: a power of two)
    else:
        scale_dtype = choose_scale_dtype(amax, fmt)
    codes, scales = quantize_rows(flat, fmt, g, scale_dtype, clip_search)
    return QTensor(fmt, tuple(x.shape), g, pack_codes(codes, fmt).reshape(*lead, -1),
                   scales.reshape(*lead, ngroups) * np.float32(2.0 ** t), scale_dtype, t)


def relative_error(sq_err: float, sq_ref: float) -> float:
    """sqrt(err / ref); 0 for an all-zero tensor (which always quantizes exactly)."""
    return float(np.sqrt(sq_err / sq_ref)) if sq_ref > 0 else 0.0
