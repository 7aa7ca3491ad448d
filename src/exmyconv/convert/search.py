"""`--format auto`: choose a format per tensor under a bits budget.

Each tensor is quantized (in memory, chunk by chunk) with every candidate; its size in bytes is
exact (payload + scales, padding included) and its error is the relative weight MSE ‖W−Ŵ‖²/‖W‖²,
or with calibration data the error weighted by the inputs' second moments (see measure). The model
objective is Σ_t n_t · err_t (n_t: weights of tensor t), minimised subject to
Σ_t 8·bytes_t ≤ B · Σ_t n_t by Lagrangian relaxation: for a multiplier λ every tensor takes the
candidate minimising n_t·err_t + λ·bytes_t (a point of its lower convex hull), λ bisected to the
budget — and by a dynamic programme on sizes rounded up to 1/100000 of the budget, which also
finds solutions off the hull; the better wins, and leftover bytes go to the best upgrades. A single
candidate for every tensor that fits and has less total error replaces the mix (best_single).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import ExmyError
from ..format.exmy import ExMy, get_format
from ..format.pack import row_bytes
from .gptq import gptq_rows
from ..format.fused import fused_weight
from ..format.quant import choose_scale_dtype, dequantize_codes, group_amax, groups_of, quantize_rows, scale_exponent

# From 3.25 bits per weight (e2m1s4, before padding and scales) to 8 (e4m3), with group variants
# between, so that any budget from the cheapest to the richest has a solution.
DEFAULT_CANDIDATES = ("e2m1s4", "e2m1", "e2m1-g128", "e2m1-g64", "e2m1-g32", "e2m2s4", "e2m2s4-g128",
                      "e2m2s4-g64", "e2m2", "e2m2-g128", "e2m2-g64", "e2m3s3", "e2m3s3-g128", "e3m2", "e2m3",
                      "e2m3-g64", "e4m3")
_CANDIDATE = re.compile(r"(e\dm\d(?:s\d)?)(?:-g(\d+))?(\+clip)?")


@dataclass(frozen=True)
class Candidate:
    fmt: ExMy
    group_size: int | None = None
    clip: bool = False
    scales8: bool = False  # --scales e4m3: 8-bit group scales (a run-wide choice, not part of the name)

    @property
    def name(self) -> str:
        return self.fmt.name + (f"-g{self.group_size}" if self.group_size else "") + ("+clip" if self.clip else "")

    def nbytes(self, shape: tuple[int, ...]) -> int:
        rows = int(np.prod(shape[:-1]))
        _, ngroups = groups_of(shape[-1], self.group_size)
        return rows * (row_bytes(self.fmt, shape[-1]) + (1 if self.scales8 else 2) * ngroups)


def parse_candidates(text: str | None, clip: bool = False, scales8: bool = False) -> list[Candidate]:
    names = [n.strip() for n in text.split(",") if n.strip()] if text is not None else list(DEFAULT_CANDIDATES)
    out = []
    for name in names:
        m = _CANDIDATE.fullmatch(name.lower())
        if not m:
            raise ExmyError(f"bad candidate {name!r}: use FORMAT[-gGROUP][+clip], e.g. e2m2-g64")
        group = int(m[2]) if m[2] else None
        if group is not None and group < 1:
            raise ExmyError(f"bad candidate {name!r}: group size must be positive")
        out.append(Candidate(get_format(m[1]), group, clip or bool(m[3]), scales8))
    if not out:
        raise ExmyError("--candidates is empty")
    return out


def fused_groups(names: list[str], shapes: list[tuple[int, ...]]) -> list[list[int]]:
    """Indices of ``names`` grouped by the weight an engine fuses them into (format.fused.fused_weight: q/k/v
    or gate/up under one parent module, a MoE layer's gate/up or down projections of every expert) with
    the same input size K; every other tensor is a group of its own."""
    groups: dict = {}
    for i, (name, shape) in enumerate(zip(names, shapes)):
        fused = fused_weight(name)
        key = (i,) if fused is None else (fused, tuple(shape[:-2]), shape[-1])
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def measure(chunks, candidates: list[Candidate], importance: np.ndarray | None = None,
            factor: np.ndarray | None = None) -> np.ndarray:
    """Relative (importance-weighted) squared error of each candidate over a tensor given as float32 row chunks.

    ``chunks``: a callable returning an iterator of float32 [R, K] blocks (called twice).
    ``importance``: None (plain weight MSE), [K] per-channel weights E[x_j²] (Σ_j E[x_j²]·‖ΔW[:, j]‖²),
    or [K, K] second moments H = E[x xᵀ] (Σ_rows ΔW H ΔWᵀ: the squared output error on the calibration
    inputs); the rounding itself (clipping search) sees the diagonal. ``factor`` (with a [K, K]
    importance: its gptq.inverse_factor): each candidate rounded as ``--rounding gptq`` writes it
    (gptq.gptq_rows), so the errors are GPTQ's proxy loss tr(ΔW H ΔWᵀ) relative to tr(W H Wᵀ).
    """
    amax_all = {}
    for c in candidates:  # scale dtype is a per-tensor choice: needs every group's absmax first
        key = c.group_size
        if key not in amax_all:
            parts = []
            for x in chunks():
                g, n = groups_of(x.shape[1], key)
                parts.append(group_amax(x, g, n))
            amax_all[key] = np.concatenate(parts)
    # the scale dtype is per tensor; 8-bit scales quantize x * 2^-t, t per tensor (format.quant)
    dtypes_ = {c: ("F8_E4M3", scale_exponent(amax_all[c.group_size], c.fmt)) if c.scales8
               else (choose_scale_dtype(amax_all[c.group_size], c.fmt), 0) for c in candidates}
    full = importance is not None and importance.ndim == 2
    diag = np.diagonal(importance) if full else importance
    err = np.zeros(len(candidates))
    ref = 0.0
    for x in chunks():
        ref += _weighted_square(x, importance)
        for i, c in enumerate(candidates):
            g, _ = groups_of(x.shape[1], c.group_size)
            scale_dtype, t = dtypes_[c]
            xt = x * np.float32(2.0 ** -t) if t else x  # (exact)
            if factor is None:
                codes, s = quantize_rows(xt, c.fmt, g, scale_dtype, c.clip, diag)
            else:
                codes, s = gptq_rows(xt, c.fmt, g, scale_dtype, factor, c.clip, diag)
            err[i] += _weighted_square(dequantize_codes(codes, s, c.fmt, g) - xt, importance) * 4.0 ** t
    return err / ref if ref > 0 else np.zeros(len(candidates))


def _weighted_square(d: np.ndarray, importance: np.ndarray | None) -> float:
    """Σ over rows of d·diag(w)·dᵀ ([K] importance, or none: w = 1) or d·H·dᵀ ([K, K] importance), in float64."""
    if importance is None:
        return float(np.square(d).sum(dtype=np.float64))
    if importance.ndim == 1:
        return float(np.dot(np.square(d).sum(axis=0, dtype=np.float64), importance.astype(np.float64)))
    d = d.astype(np.float64)
    return float(np.einsum("rk,rk->", d @ importance.astype(np.float64), d))


def measure_backend(scales8: bool = False):
    """(measure function, device name): torch on a CUDA GPU when there is one, else numpy (and for
    8-bit scales, which only the numpy quantizer makes)."""
    where = None if scales8 else _cuda()
    if where:
        from . import search_torch

        return search_torch.measure, where
    return measure, "cpu (numpy)"


def rounding_backend(scales8: bool = False):
    """(gptq_rows function, device name), chosen as measure_backend chooses (torch on the CPU gives
    the same codes as numpy but took 2 to 13 times as long on SmolLM2 shapes)."""
    where = None if scales8 else _cuda()
    if where:
        from . import gptq_torch

        return gptq_torch.gptq_rows, where
    return gptq_rows, "cpu (numpy)"


def _cuda() -> str:
    """'cuda (GPU NAME)' when torch can use a CUDA GPU here, else ''."""
    from ..cuda import device

    if device.torch_cuda_reason():
        return ""
    import torch

    return f"cuda ({torch.cuda.get_device_name()})"


def _pick(costs: np.ndarray, errs: np.ndarray, lam: float) -> int:
    return int(np.argmin(errs + lam * costs))


def check_budget(sizes: list[np.ndarray], budget_bytes: float, weights: int | None = None) -> None:
    """Refuse a budget no allocation fits; with ``weights`` (their count) the message says the
    smallest achievable bits per weight."""
    if not budget_bytes > 0:  # zero, negative or NaN
        raise ExmyError("the bits budget must be a positive number")
    smallest = sum(float(s.min()) for s in sizes)
    if smallest > budget_bytes:
        if weights:
            raise ExmyError(f"bits budget too small: {8 * budget_bytes / weights:g} bits/weight asked, the smallest "
                            f"achievable with these candidates is {8 * smallest / weights:.3f} (scales and padding "
                            "included)")
        raise ExmyError(f"bits budget too small: the smallest candidates need {smallest / budget_bytes:.3f}x the budget")


def allocate(sizes: list[np.ndarray], errors: list[np.ndarray], budget_bytes: float) -> tuple[list[int], float]:
    """Per tensor, the index of a candidate: minimise Σ errors under Σ sizes ≤ budget.

    ``errors`` are already weighted (n_t · err_t). Two feasible solutions, the better one wins:
    the Lagrangian one (λ bisected to the budget, every tensor on its lower convex hull) and a
    dynamic programme over sizes rounded up to 1/DP_STEPS of the budget (exact up to that
    rounding, and able to leave the hull). Leftover bytes then go to the best error-per-byte
    upgrades. Returns (choices, λ).
    """
    check_budget(sizes, budget_bytes)

    def total(lam):
        picks = [_pick(s, e, lam) for s, e in zip(sizes, errors)]
        return picks, sum(float(s[p]) for s, p in zip(sizes, picks))

    picks, used = total(0.0)
    if used <= budget_bytes:  # every tensor's least error: no mix or single format does better
        return picks, 0.0
    lo, hi = 0.0, 1.0
    while total(hi)[1] > budget_bytes:
        hi *= 4
    for _ in range(100):
        mid = (lo + hi) / 2
        if total(mid)[1] > budget_bytes:
            lo = mid
        else:
            hi = mid
    candidates = [total(hi)[0]]
    dp = _knapsack(sizes, errors, budget_bytes)
    if dp is not None:
        candidates.append(dp)
    picks = min(candidates, key=lambda p: sum(float(e[q]) for e, q in zip(errors, p)))
    picks = _fill_slack(sizes, errors, list(picks), budget_bytes)
    single = best_single(sizes, errors, budget_bytes)
    if single is not None and _total(errors, [single] * len(sizes)) < _total(errors, picks):
        picks = [single] * len(sizes)
    return picks, hi


def _total(errors, picks) -> float:
    return sum(float(e[p]) for e, p in zip(errors, picks))


def best_single(sizes: list[np.ndarray], errors: list[np.ndarray], budget_bytes: float) -> int | None:
    """The one candidate for every tensor with the least total error within the budget (None: none fits).
    allocate never returns a mix worse than it."""
    fits = [c for c in range(len(sizes[0])) if sum(float(s[c]) for s in sizes) <= budget_bytes]
    return min(fits, key=lambda c: _total(errors, [c] * len(sizes))) if fits else None


DP_STEPS = 100000


def _knapsack(sizes, errors, budget_bytes, steps: int = DP_STEPS):
    """Multiple-choice knapsack by dynamic programming on sizes rounded up to a unit of
    max(1 byte, budget/steps): exact when the budget is at most ``steps`` bytes."""
    unit = max(1.0, budget_bytes / steps)
    steps = int(budget_bytes // unit)
    best = np.zeros(steps + 1)  # least error with at most b units used, tensors so far
    choice = np.zeros((len(sizes), steps + 1), dtype=np.int16)
    for t, (s, e) in enumerate(zip(sizes, errors)):
        new = np.full(steps + 1, np.inf)
        for c, (size, err) in enumerate(zip(s, e)):
            w = int(np.ceil(size / unit - 1e-9))
            if w > steps:
                continue
            shifted = np.full(steps + 1, np.inf)
            shifted[w:] = best[: steps + 1 - w] + err
            better = shifted < new
            new[better] = shifted[better]
            choice[t, better] = c
        best = new
    if not np.isfinite(best[steps]):
        return None
    picks, b = [0] * len(sizes), steps
    for t in range(len(sizes) - 1, -1, -1):
        c = int(choice[t, b])
        picks[t] = c
        b -= int(np.ceil(sizes[t][c] / unit - 1e-9))
    return picks


def _fill_slack(sizes, errors, picks, budget_bytes):
    """Repeatedly take the affordable upgrade with the best error drop per byte."""
    used = sum(float(s[p]) for s, p in zip(sizes, picks))
    while True:
        best = None
        for t, (s, e) in enumerate(zip(sizes, errors)):
            p = picks[t]
            for q in range(len(s)):
                extra = float(s[q] - s[p])
                gain = float(e[p] - e[q])
                if gain > 0 and used + max(extra, 0) <= budget_bytes:
                    ratio = gain / max(extra, 1e-9)
                    if best is None or ratio > best[0]:
                        best = (ratio, t, q, extra)
        if best is None:
            return picks
        _, t, q, extra = best
        picks[t] = q
        used += extra


def tradeoff(sizes, errors, numels, points: int = 200) -> list[dict]:
    """The model's error-vs-bits curve: optimal allocations for a sweep of λ."""
    total_n = float(sum(numels))
    out = {}
    for lam in [0.0] + list(np.geomspace(1e-14, 1e4, points)):
        picks = [_pick(s, e, lam) for s, e in zip(sizes, errors)]
        bits = 8 * sum(float(s[p]) for s, p in zip(sizes, picks)) / total_n
        err = sum(float(e[p]) for e, p in zip(errors, picks)) / total_n
        out[round(bits, 4)] = err
    return [{"bits": b, "mean_rel_mse": e} for b, e in sorted(out.items())]
