"""Integer round-to-nearest (RTN) baselines: quantize -> dequantize in numpy, for comparisons.

These are the usual peers' defaults (GPTQ/AWQ-style weight-only "intB-gG" without any
calibration or error feedback), written here from the definition so that the quality benchmark
(`exmyconv bench --quality`, :mod:`exmyconv.bench.compare`) can put ExMy formats next to them at equal bits. Nothing here is
written to a checkpoint; the functions return the dequantized float32 weights.

The scheme, for B-bit codes (qmax = 2^B - 1) and groups of G consecutive elements along the last
(input) dimension of each row (a row whose length G does not divide ends with a shorter group;
``group_size=None`` or G >= K means one group per row):

1. Per group, the range is made to contain zero: ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``
   (as GPTQ does; for weight groups, which have both signs, this is AWQ's min/max too).
2. ``scale = (hi - lo) / qmax``, rounded to fp16 (it is stored as fp16) and kept inside the
   positive fp16 range [2^-24, 65504]. A group whose range is zero (all zeros) gets scale 1.
3. ``zero = clip(rint(-lo / scale), 0, qmax)``: an integer zero point (stored as fp16, exact).
4. ``q = clip(rint(x / scale) + zero, 0, qmax)``; ``rint`` rounds half to even.
5. ``x_hat = (q - zero) * scale`` (float32).

Zero is represented exactly (q = zero), so an all-zero group dequantizes to zeros, and no step
divides by zero or produces NaN/Inf for finite input.

Storage, counted as the peers' checkpoints hold it when scales and zero points are fp16:
B bits per weight plus 16 (scale) + 16 (zero point) bits per group, i.e. ``B + 32 / G`` bits per
weight when G divides K: int4-g128 = 4.25, int4-g64 = 4.5, int4-g32 = 5.0, int5-g128 = 5.25.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..format.quant import groups_of

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)
SCALE_BITS = 16
ZERO_BITS = 16
_NAME = re.compile(r"int([2-8])(?:-g(\d+))?")


@dataclass(frozen=True)
class IntScheme:
    """Asymmetric B-bit integer RTN with one fp16 scale and one fp16 zero point per group."""

    bits: int
    group_size: int | None = None  # None: one group per row

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"int{self.bits}: need 2 <= bits <= 8")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError("group size must be positive")

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f"-g{self.group_size}" if self.group_size else "")

    def groups(self, k: int) -> tuple[int, int]:
        """(G, groups per row) for rows of k elements."""
        return groups_of(k, self.group_size)

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Exact bits to store a tensor of this shape: codes + fp16 scale + fp16 zero per group."""
        k = shape[-1]
        rows = int(np.prod(shape[:-1]))
        _, ngroups = self.groups(k)
        return rows * (k * self.bits + ngroups * (SCALE_BITS + ZERO_BITS))

    def bits_per_weight(self, shape: tuple[int, ...]) -> float:
        return self.storage_bits(shape) / int(np.prod(shape))

    def quantize(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float [..., K] -> (codes uint8 [..., K], scales float32 [..., ngroups], zeros float32 [..., ngroups]).

        Scales are exact fp16 values and zeros exact integers, both returned as float32.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim < 1 or x.shape[-1] == 0:
            raise ValueError("need a non-empty last dimension")
        lead, k = x.shape[:-1], x.shape[-1]
        g, ngroups = self.groups(k)
        qmax = 2**self.bits - 1
        grouped = _grouped(x.reshape(-1, k), g, ngroups)  # [R, ngroups, g], padded with zeros
        lo = np.minimum(grouped.min(axis=-1), 0.0)  # zero padding cannot widen a zero-including range
        hi = np.maximum(grouped.max(axis=-1), 0.0)
        span = (hi.astype(np.float64) - lo.astype(np.float64)) / qmax
        with np.errstate(over="ignore"):
            scale = span.astype(np.float16).astype(np.float32)
        scale = np.clip(scale, FP16_TINY, FP16_MAX).astype(np.float32)
        scale[span == 0] = 1.0
        zero = np.clip(np.rint(-lo / scale), 0, qmax).astype(np.float32)
        q = np.clip(np.rint(grouped / scale[..., None]) + zero[..., None], 0, qmax)
        codes = q.reshape(q.shape[0], -1)[:, :k].astype(np.uint8)
        return codes.reshape(*lead, k), scale.reshape(*lead, ngroups), zero.reshape(*lead, ngroups)

    def dequantize(self, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
        """(codes, scales, zeros) -> float32 [..., K]: (q - zero) * scale."""
        k = codes.shape[-1]
        g, _ = self.groups(k)
        s = np.repeat(scales, g, axis=-1)[..., :k]
        z = np.repeat(zeros, g, axis=-1)[..., :k]
        return ((codes.astype(np.float32) - z) * s).astype(np.float32)

    def fake_quantize(self, x: np.ndarray) -> np.ndarray:
        """quantize then dequantize: the weights a RTN intB-gG checkpoint would compute with."""
        return self.dequantize(*self.quantize(x))


def _grouped(x: np.ndarray, g: int, ngroups: int) -> np.ndarray:
    rows, k = x.shape
    if ngroups * g != k:
        x = np.pad(x, ((0, 0), (0, ngroups * g - k)))
    return x.reshape(rows, ngroups, g)


def parse(name: str) -> IntScheme:
    """'int4-g128' -> IntScheme(4, 128); 'int8' -> one group per row."""
    m = _NAME.fullmatch(name.strip().lower())
    if not m:
        raise ValueError(f"bad integer scheme {name!r}: use intB[-gG], e.g. int4-g128")
    return IntScheme(int(m[1]), int(m[2]) if m[2] else None)


def fake_quantize(x: np.ndarray, bits: int, group_size: int | None = None) -> np.ndarray:
    return IntScheme(bits, group_size).fake_quantize(x)


def relative_error(x: np.ndarray, x_hat: np.ndarray) -> float:
    """||x - x_hat|| / ||x|| (0 for an all-zero x), in float64."""
    x = np.asarray(x, np.float64)
    ref = float(np.sqrt(np.square(x).sum()))
    return float(np.sqrt(np.square(x - np.asarray(x_hat, np.float64)).sum())) / ref if ref > 0 else 0.0
