"""The format search's error measurement in torch, for a GPU (or torch on the CPU).

Quantizes with the torch codec (:mod:`exmyconv.torch.codec`, the same arithmetic as the numpy
reference; GPTQ's errors with convert/gptq_torch.py) and sums errors in float64.
tests/test_search_torch.py checks it against :func:`exmyconv.convert.search.measure`.
"""
from __future__ import annotations

import numpy as np
import torch

from ..format.quant import CLIP_RATIOS, groups_of
from . import gptq
from .gptq_torch import Torch, device
from ..torch.codec import grouped, reconstruct, scale_dtype, scales_for


def measure(chunks, candidates, importance: np.ndarray | None = None, factor: np.ndarray | None = None) -> np.ndarray:
    """search.measure on torch (``device()``); same contract."""
    dev = device()
    ops = None if factor is None else Torch(dev)
    full = None if importance is None or importance.ndim == 1 else torch.as_tensor(importance, dtype=torch.float64,
                                                                                   device=dev)
    if full is not None:  # the rounding sees the diagonal; the error is the output error under H
        importance = np.diagonal(importance).copy()
    imp = None if importance is None else torch.as_tensor(importance, dtype=torch.float64, device=dev)
    blocks = [torch.as_tensor(x, device=dev) for x in chunks()]
    amax = {}
    for c in candidates:
        if c.group_size not in amax:
            amax[c.group_size] = [
                grouped(x, *groups_of(x.shape[1], c.group_size)).abs().amax(-1) for x in blocks]
    err = torch.zeros(len(candidates), dtype=torch.float64, device=dev)
    ref = torch.zeros((), dtype=torch.float64, device=dev)
    for i, c in enumerate(candidates):
        dtype = scale_dtype(torch.cat(amax[c.group_size]), c.fmt)
        for x, am in zip(blocks, amax[c.group_size]):
            g, _ = groups_of(x.shape[1], c.group_size)
            if ops is not None:  # a factor: GPTQ's codes and scales, the error as for the others
                codes, s = gptq.gptq_rows(x.cpu().numpy(), c.fmt, g, dtype, factor, c.clip, importance, ops)
                s = torch.as_tensor(s, device=dev).repeat_interleave(g, dim=1)[:, :x.shape[1]]
                err[i] += _weighted_square(ops.table(c.fmt)[codes.long()] * s - x, imp, full)
                continue
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
            err[i] += _weighted_square(reconstruct(x, c.fmt, g, best, imp) - x, imp, full)
    for x in blocks:
        ref += _weighted_square(x, imp, full)
    ref = float(ref)
    return (err / ref).cpu().numpy() if ref > 0 else np.zeros(len(candidates))


def _weighted_square(d, imp, full):
    """search._weighted_square in torch: d·H·dᵀ summed over rows with ``full`` H, else per-channel weights."""
    d = d.double()
    if full is not None:
        return ((d @ full) * d).sum()
    per_channel = d.square().sum(0)
    return per_channel @ imp if imp is not None else per_channel.sum()


def _group_errors(x, fmt, g, s, imp):
    sq = (reconstruct(x, fmt, g, s, imp) - x).double().square()
    return grouped(sq if imp is None else sq * imp, g, s.shape[1]).sum(-1)
