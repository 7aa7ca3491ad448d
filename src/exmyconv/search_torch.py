"""The format search's error measurement in torch, for a GPU (or torch on the CPU).

Same arithmetic as the numpy reference (quant.py, formats.py): absmax scales rounded to the
tensor's fp16/bf16 scale dtype, float32 magic-add rounding, the exact shared-bit choice, float64
error sums. tests/test_search_torch.py checks codes and errors against the reference.
"""
from __future__ import annotations

import numpy as np
import torch

from .formats import ExMy
from .quant import CLIP_RATIOS, FP16_MAX, SMALLEST_NORMAL, groups_of

_TORCH_DTYPE = {"F16": torch.float16, "BF16": torch.bfloat16}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def encode_nearest(fmt: ExMy, y: torch.Tensor) -> torch.Tensor:
    """formats.ExMy.encode_nearest on a float32 tensor; int32 codes."""
    a = y.abs().clamp_(max=fmt.max)
    emin_bits = (fmt.emin + 127) << 23
    ebits = (a.view(torch.int32) & 0x7F800000).clamp_(min=emin_bits)
    code = (ebits - emin_bits) >> (23 - fmt.m)
    total = a + (ebits + ((23 - fmt.m) << 23)).view(torch.float32)
    code += total.view(torch.int32) & 0x7FFFFF
    if fmt.m == 0:
        tie = ((a.view(torch.int32) & 0x7FFFFF) == 0x400000) & (a >= 2.0**fmt.emin)
        code -= torch.where(tie, code & 1, 0)
    return code | (((y.view(torch.int32) >> 31) & 1) << (fmt.e + fmt.m))


def encode(fmt: ExMy, y: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    codes = encode_nearest(fmt, y)
    if fmt.share == 1:
        return codes
    rows, k = y.shape
    signbit = 1 << (fmt.e + fmt.m)
    values = torch.as_tensor(fmt.table[:signbit].astype(np.float64), device=y.device)
    mag = codes & (signbit - 1)
    a = y.double().abs()
    lo, hi = (mag - 1).clamp(min=0), (mag + 1).clamp(max=signbit - 1)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=y.device)
    d_lo = torch.where(mag > 0, a - values[lo], inf)
    d_hi = torch.where(mag < signbit - 1, values[hi] - a, inf)
    flip = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where((lo >> 1) % 2 == 0, lo, hi)))
    err_keep, err_flip = (a - values[mag]).square(), (a - values[flip]).square()
    lsb = mag & 1
    w = torch.ones_like(a) if weight is None else weight.double().expand_as(a)
    groups = -(-k // fmt.share)
    pad = groups * fmt.share - k
    err = [torch.nn.functional.pad(torch.where(lsb == b, err_keep, err_flip) * w, (0, pad))
           .view(rows, groups, fmt.share).sum(-1) for b in (0, 1)]
    bit = (err[1] < err[0]).int().repeat_interleave(fmt.share, dim=1)[:, :k]
    return torch.where(lsb == bit, mag, flip) | (codes & signbit)


def _grouped(x: torch.Tensor, g: int, ngroups: int) -> torch.Tensor:
    rows, k = x.shape
    return torch.nn.functional.pad(x, (0, ngroups * g - k)).view(rows, ngroups, g)


def scale_dtype(amax: torch.Tensor, fmt: ExMy) -> str:
    s = (amax[amax > 0] / fmt.max).to(torch.float16).float()
    fits = bool((s >= SMALLEST_NORMAL["F16"]).all()) and bool((s * fmt.max <= FP16_MAX).all())
    return "F16" if fits else "BF16"


def scales_for(amax: torch.Tensor, fmt: ExMy, dtype: str) -> torch.Tensor:
    s = (amax / fmt.max).to(_TORCH_DTYPE[dtype]).float()
    return s.clamp(min=SMALLEST_NORMAL[dtype])  # (the rare float32-overflow round-down is not needed here)


def reconstruct(x: torch.Tensor, fmt: ExMy, g: int, s: torch.Tensor, importance) -> torch.Tensor:
    """Quantize-dequantize float32 [R, K] with scales s [R, ngroups] (the writer's arithmetic)."""
    rows, k = x.shape
    per_element = s.repeat_interleave(g, dim=1)[:, :k]
    y = (_grouped(x, g, s.shape[1]) / s[..., None]).reshape(rows, -1)[:, :k]
    weight = None
    if fmt.share > 1:
        weight = per_element.square() if importance is None else per_element.square() * importance
    codes = encode(fmt, y, weight)
    return torch.as_tensor(fmt.table, device=x.device)[codes] * per_element


def measure(chunks, candidates, importance: np.ndarray | None = None) -> np.ndarray:
    """search.measure on torch (``device()``); same contract."""
    dev = device()
    imp = None if importance is None else torch.as_tensor(importance, dtype=torch.float64, device=dev)
    blocks = [torch.as_tensor(x, device=dev) for x in chunks()]
    amax = {}
    for c in candidates:
        if c.group_size not in amax:
            amax[c.group_size] = [
                _grouped(x, *groups_of(x.shape[1], c.group_size)).abs().amax(-1) for x in blocks]
    err = torch.zeros(len(candidates), dtype=torch.float64, device=dev)
    ref = torch.zeros((), dtype=torch.float64, device=dev)
    for i, c in enumerate(candidates):
        dtype = scale_dtype(torch.cat(amax[c.group_size]), c.fmt)
        for x, am in zip(blocks, amax[c.group_size]):
            g, _ = groups_of(x.shape[1], c.group_size)
            if not c.clip:
                best = scales_for(am, c.fmt, dtype)
            else:  # per group, the clipping ratio with the least (weighted) error
                best_err = best = None
                for ratio in CLIP_RATIOS:
                    s = scales_for(am * float(ratio), c.fmt, dtype)
                    e = _group_errors(x, c.fmt, g, s, imp)
                    if best is None:
                        best, best_err = s, e
                    else:
                        better = e < best_err
                        best, best_err = torch.where(better, s, best), torch.where(better, e, best_err)
            per_channel = (reconstruct(x, c.fmt, g, best, imp) - x).double().square().sum(0)
            err[i] += per_channel @ (imp if imp is not None else torch.ones_like(per_channel))
    for x in blocks:
        sq = x.double().square().sum(0)
        ref += sq @ (imp if imp is not None else torch.ones_like(sq))
    ref = float(ref)
    return (err / ref).cpu().numpy() if ref > 0 else np.zeros(len(candidates))


def _group_errors(x, fmt, g, s, imp):
    sq = (reconstruct(x, fmt, g, s, imp) - x).double().square()
    return _grouped(sq if imp is None else sq * imp, g, s.shape[1]).sum(-1)
