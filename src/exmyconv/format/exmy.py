"""ExMy number formats: one declarative definition, everything else derived.

A format is 1 sign bit, ``e`` exponent bits and ``m`` mantissa bits, exponent bias
2^(e-1)-1, subnormals, no infinity and no NaN (formats/SPEC.md section 1). With ``share`` = k > 1,
k consecutive weights of a row share their least significant mantissa bit (AMS-Quant): the values
are those of eXmY, but each group of k holds only codes with the same last bit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import ExmyError


@dataclass(frozen=True)
class ExMy:
    e: int
    m: int
    share: int = 1  # k weights share the last mantissa bit

    def __post_init__(self):
        if not (1 <= self.e <= 5 and 0 <= self.m <= 5 and self.bits <= 8):
            raise ExmyError(f"no such format e{self.e}m{self.m}: need 1<=E<=5, 0<=M<=5, 1+E+M<=8")
        if not 1 <= self.share <= 8 or (self.share > 1 and self.m == 0):
            raise ExmyError(f"no such format {self.name}: sharing needs M>=1 and 2<=k<=8")

    @property
    def name(self) -> str:
        return f"e{self.e}m{self.m}" + (f"s{self.share}" if self.share > 1 else "")

    @property
    def bits(self) -> int:
        """Width of a full code."""
        return 1 + self.e + self.m

    @property
    def own_bits(self) -> int:
        """Bits stored per weight (the shared bit excluded)."""
        return self.bits - (self.share > 1)

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight before padding and scales."""
        return self.own_bits + (1 / self.share if self.share > 1 else 0)

    @property
    def bias(self) -> int:
        return 2 ** (self.e - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (also of the subnormals)."""
        return 1 - self.bias

    @property
    def max(self) -> float:
        return 2.0 ** (2**self.e - 1 - self.bias) * (2 - 2.0**-self.m)

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.m)

    @property
    def planes(self) -> tuple[int, ...]:
        """Per-weight bit-plane widths, widest first: the binary digits of ``own_bits`` (SPEC 3)."""
        return tuple(w for w in (8, 4, 2, 1) if self.own_bits & w)

    @cached_property
    def table(self) -> np.ndarray:
        """float32 value of every code 0 .. 2^bits - 1."""
        mag_codes = np.arange(2 ** (self.e + self.m))
        f, mant = mag_codes >> self.m, mag_codes & (2**self.m - 1)
        sig = np.where(f == 0, mant, mant + 2**self.m)
        mags = np.ldexp(sig.astype(np.float64), np.maximum(f, 1) - self.bias - self.m)
        return np.concatenate([mags, -mags]).astype(np.float32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.table[np.asarray(codes, dtype=np.uint8)]

    def encode(self, y: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
        """Round float32 values to codes (uint8): nearest, ties to even code, saturating.

        Shared formats: ``y`` is [rows, K]; per group of ``share`` elements along K the shared bit
        is the one with the least weighted squared error (``weight`` broadcast to y; default 1).
        """
        codes = self.encode_nearest(y)
        return codes if self.share == 1 else self._share_last_bit(y, codes, weight)

    def encode_nearest(self, y: np.ndarray) -> np.ndarray:
        """Round float32 values to codes (uint8): nearest, ties to even code, saturating.

        NaN is not accepted (callers reject it before); -0 and negatives that round to zero
        keep their sign bit. Works on float32 bit patterns, a cache-sized block at a time.
        """
        y = np.ascontiguousarray(y, dtype=np.float32)
        out = np.empty(y.shape, dtype=np.uint8)
        flat_y, flat_out = y.reshape(-1), out.reshape(-1)
        for start in range(0, flat_y.size, _BLOCK):
            self._encode_block(flat_y[start:start + _BLOCK], flat_out[start:start + _BLOCK])
        return out

    def _encode_block(self, y: np.ndarray, out: np.ndarray) -> None:
        a = np.abs(y)
        np.minimum(a, np.float32(self.max), out=a)  # saturate
        # Binade exponent e = max(exponent of a, emin), as float32 exponent bits.
        emin_bits = (self.emin + 127) << 23
        ebits = a.view(np.int32) & 0x7F800000
        np.maximum(ebits, emin_bits, out=ebits)
        code = ebits - emin_bits
        code >>= 23 - self.m  # (e - emin) << M: the code of the binade's first value
        # Adding 2^(e + 23 - M) makes float32 round a to a multiple of 2^(e - M), nearest-even;
        # the sum's mantissa field is then that multiple's count k, and code = above + k.
        ebits += (23 - self.m) << 23
        total = a + ebits.view(np.float32)
        code += total.view(np.int32) & 0x7FFFFF
        if self.m == 0:  # k is 1 or 2 here: a tie at 1.5 * 2^e must go to the even code instead
            tie = ((a.view(np.int32) & 0x7FFFFF) == 0x400000) & (a >= np.float32(2.0**self.emin))
            code[tie] -= code[tie] & 1
        code |= (y.view(np.uint32) >> 31).view(np.int32) << (self.e + self.m)  # sign of y, -0 too
        out[...] = code


    def nearest_with_last_bit(self, y: np.ndarray, bit) -> np.ndarray:
        """Per element, the nearest code (uint8) whose last bit is ``bit`` (0/1, broadcast to y):
        its nearest code if that already ends in ``bit``, else the nearer of its two neighbours
        (tie: the one whose code without the last bit is even). Keeps y's sign bit."""
        codes = self.encode_nearest(y)
        mag, flip = self._flip_candidates(y, codes)
        return np.where((mag & 1) == bit, mag, flip).astype(np.uint8) | (codes & np.uint8(1 << (self.e + self.m)))

    def _flip_candidates(self, y: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(magnitude code, the nearer neighbour magnitude code) of nearest codes ``codes`` of ``y``."""
        signbit = np.uint8(1 << (self.e + self.m))
        mag = (codes & (signbit - 1)).astype(np.int16)
        values = self.table[: int(signbit)].astype(np.float64)
        a = np.abs(y.astype(np.float64))
        top = int(signbit) - 1
        lo, hi = np.maximum(mag - 1, 0), np.minimum(mag + 1, top)
        d_lo = np.where(mag > 0, a - values[lo], np.inf)
        d_hi = np.where(mag < top, values[hi] - a, np.inf)
        flip = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where((lo >> 1) % 2 == 0, lo, hi)))
        return mag, flip

    def _share_last_bit(self, y: np.ndarray, codes: np.ndarray, weight) -> np.ndarray:
        """Exact per-group choice of the shared bit (SPEC section 1, shared formats).

        For each bit value b, every element takes its nearest code whose last bit is b (see
        ``nearest_with_last_bit``). The group keeps the b with the smaller weighted squared error
        (tie: 0).
        """
        rows, k = y.shape
        signbit = np.uint8(1 << (self.e + self.m))
        mag, flip = self._flip_candidates(y, codes)
        values = self.table[: int(signbit)].astype(np.float64)
        a = np.abs(y.astype(np.float64))
        err_keep = np.square(a - values[mag])
        err_flip = np.square(a - values[flip])
        lsb = mag & 1
        w = np.broadcast_to(np.float64(1) if weight is None else weight, y.shape)
        groups = -(-k // self.share)
        pad = ((0, 0), (0, groups * self.share - k))
        err = [np.pad(np.where(lsb == b, err_keep, err_flip) * w, pad).reshape(rows, groups, self.share).sum(-1)
               for b in (0, 1)]
        bit = np.repeat((err[1] < err[0]).astype(np.int16), self.share, axis=1)[:, :k]
        final = np.where(lsb == bit, mag, flip).astype(np.uint8)
        return final | (codes & signbit)


_BLOCK = 1 << 16  # elements per encode step: keeps the temporaries in cache


# The named formats users ask for by name; any valid eXmY parses too.
NAMED = ("e2m1", "e2m2", "e3m1", "e2m3", "e3m2", "e4m3")
NAMED_SHARED = ("e2m2s4", "e2m3s3")  # mantissa-shared: 4.25 and 5.33 bits per weight
DEFAULT = "e2m2"

_NAME = re.compile(r"e([0-9])m([0-9])(?:s([2-9]))?")


def get_format(name: str) -> ExMy:
    match = _NAME.fullmatch(name.strip().lower()) if isinstance(name, str) else None
    if not match:
        raise ExmyError(f"unknown format {name!r}: use one of {', '.join(NAMED + NAMED_SHARED)}, any eXmY or eXmYsk (2<=k<=8)")
    return ExMy(int(match[1]), int(match[2]), int(match[3] or 1))


def all_formats(shared: bool = False) -> list[ExMy]:
    """Every unshared ExMy; with ``shared``, every eXmYsk instead."""
    if shared:
        return [ExMy(f.e, f.m, k) for f in all_formats() if f.m >= 1 for k in range(2, 9)]
    return [ExMy(e, m) for e in range(1, 6) for m in range(0, 6) if 1 + e + m <= 8]
