"""ExMy number formats: one declarative definition, everything else derived.

A format is 1 sign bit, ``e`` exponent bits and ``m`` mantissa bits, exponent bias
2^(e-1)-1, subnormals, no infinity and no NaN (formats/SPEC.md section 1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import ExmyError


@dataclass(frozen=True)
class ExMy:
    e: int
    m: int

    def __post_init__(self):
        if not (1 <= self.e <= 5 and 0 <= self.m <= 5 and self.bits <= 8):
            raise ExmyError(f"no such format e{self.e}m{self.m}: need 1<=E<=5, 0<=M<=5, 1+E+M<=8")

    @property
    def name(self) -> str:
        return f"e{self.e}m{self.m}"

    @property
    def bits(self) -> int:
        return 1 + self.e + self.m

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
        """Bit-plane widths, widest first: the binary digits of ``bits`` (SPEC section 3)."""
        return tuple(w for w in (8, 4, 2, 1) if self.bits & w)

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

    def encode(self, y: np.ndarray) -> np.ndarray:
        """Round float32 values to codes (uint8): nearest, ties to even code, saturating.

        NaN is not accepted (callers reject it before); -0 and negatives that round to zero
        keep their sign bit.
        """
        y = np.asarray(y, dtype=np.float32)
        a = np.minimum(np.abs(y), np.float32(self.max))
        _, ex = np.frexp(a)  # a = f * 2^ex, f in [0.5, 1): floor(log2 a) = ex - 1
        e = np.maximum(ex - 1, self.emin)  # binade exponent, subnormals share emin's quantum
        n = np.ldexp(a, self.m - e)  # a in units of the binade's quantum: exact
        n_lo = np.floor(n)
        frac = n - n_lo
        base = ((e - self.emin) << self.m) + n_lo.astype(np.int32)  # code of the value below
        up = (frac > 0.5) | ((frac == 0.5) & ((base & 1) == 1))
        mag = base + up
        sign = np.signbit(y).astype(np.int32) << (self.e + self.m)
        return (mag | sign).astype(np.uint8)


# The named formats users ask for by name; any valid eXmY parses too.
NAMED = ("e2m1", "e2m2", "e3m1", "e2m3", "e3m2", "e4m3")
DEFAULT = "e2m2"

_NAME = re.compile(r"e([0-9])m([0-9])")


def get_format(name: str) -> ExMy:
    match = _NAME.fullmatch(name.strip().lower())
    if not match:
        raise ExmyError(f"unknown format {name!r}: use one of {', '.join(NAMED)} or any eXmY")
    return ExMy(int(match[1]), int(match[2]))


def all_formats() -> list[ExMy]:
    return [ExMy(e, m) for e in range(1, 6) for m in range(0, 6) if 1 + e + m <= 8]
