"""--rounding gptq in torch, for a GPU: convert/gptq.py's algorithm with torch arrays.

:func:`gptq_rows` runs :func:`exmyconv.convert.gptq.gptq_rows` on torch float64 tensors (on
:func:`device`) and gives the same codes and scales as the numpy path, bit for bit
(tests/test_gptq.py with torch on the CPU, tests/test_gpu_gptq.py on CUDA).
"""
from __future__ import annotations

import numpy as np
import torch

from ..format.exmy import ExMy
from ..torch import codec
from . import gptq


def device() -> torch.device:
    """Where the torch paths run: a CUDA GPU when torch sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Torch:
    """gptq.Numpy's operations on torch tensors on one device."""

    where, round = staticmethod(torch.where), staticmethod(torch.round)

    def __init__(self, dev: torch.device):
        self.device = dev

    def array(self, a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float64, device=self.device)

    @staticmethod
    def numpy(a: torch.Tensor) -> np.ndarray:
        return a.cpu().numpy()

    @staticmethod
    def copy(a: torch.Tensor) -> torch.Tensor:
        return a.clone()

    @staticmethod
    def zeros_like(a: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(a)

    @staticmethod
    def float32(a: torch.Tensor) -> torch.Tensor:
        return a.float()

    def codes(self, rows: int, k: int) -> torch.Tensor:
        return torch.empty((rows, k), dtype=torch.uint8, device=self.device)

    def table(self, fmt: ExMy) -> torch.Tensor:
        return codec._table(fmt, self.device)

    @staticmethod
    def encode_nearest(fmt: ExMy, y: torch.Tensor) -> torch.Tensor:
        return codec.encode_nearest(fmt, y)

    def nearest_with_last_bit(self, fmt: ExMy, y: torch.Tensor, bit: int) -> torch.Tensor:
        """ExMy.nearest_with_last_bit: the nearest code ending in ``bit``, else the nearer neighbour
        (tie: the one whose code without the last bit is even); y's sign kept. int32 codes."""
        codes = codec.encode_nearest(fmt, y)
        signbit = 1 << (fmt.e + fmt.m)
        values = self.table(fmt)[:signbit].double()
        mag = codes & (signbit - 1)
        a = y.double().abs()
        lo, hi = (mag - 1).clamp(min=0), (mag + 1).clamp(max=signbit - 1)
        d_lo = torch.where(mag > 0, a - values[lo], torch.inf)
        d_hi = torch.where(mag < signbit - 1, values[hi] - a, torch.inf)
        flip = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where((lo >> 1) % 2 == 0, lo, hi)))
        return torch.where((mag & 1) == bit, mag, flip) | (codes & signbit)

    @staticmethod
    def row_amax(a: torch.Tensor) -> torch.Tensor:
        return a.abs().amax(dim=1, keepdim=True)

    @staticmethod
    def power_of_two(a: torch.Tensor) -> torch.Tensor:
        return (a.view(torch.int64) & gptq._EXPONENT).view(torch.float64)


def gptq_rows(x: np.ndarray, fmt: ExMy, g: int, scale_dtype: str, factor: np.ndarray, clip_search: bool = False,
              importance: np.ndarray | None = None, dev: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """gptq.gptq_rows on torch (``dev``, default :func:`device`); same contract."""
    codes, scales = gptq.gptq_rows(x, fmt, g, scale_dtype, factor, clip_search, importance, Torch(dev or device()))
    return codes.cpu().numpy(), scales
