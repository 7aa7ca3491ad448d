"""Error-compensating rounding (``--rounding gptq``): GPTQ (Frantar et al., 2022) on ExMy grids.

The proxy loss of a quantized layer is tr(ΔW H ΔWᵀ), H = XᵀX/n over the calibration inputs of the
layer. The columns of W [N, K] are rounded in order; the error of column c, divided by U[c, c],
is pushed onto the columns still to come through row c of U, the upper Cholesky factor of H⁻¹
(H⁻¹ = UᵀU): that is the best update of the remaining weights for the proxy loss, and rounding
column c adds (error / U[c, c])² to it. Columns are taken in blocks: inside a block the update
is applied column by column, to the columns after the block once per block (one matrix product).

Checkpoint layout as for nearest rounding (the output is codes + scales the packer accepts):

- a scale group's scale is set when its first column is reached, from the weights as they are
  then (already compensated), by the same rule as nearest rounding (format.quant.quantize_rows);
- shared formats: the k columns of a share block are rounded together, once with each value of
  the shared bit (each element to its nearest code with that last bit, the error pushed onto the
  block's later columns as it goes); each row keeps the bit whose block adds less to the loss
  (0 on a tie).

With a diagonal H nothing is pushed anywhere and the codes are those of nearest rounding.
numpy, float64; deterministic.
"""
from __future__ import annotations

import numpy as np

from ..errors import ExmyError
from ..format.exmy import ExMy
from ..format.quant import quantize_rows

DAMP = 0.01  # added to H's diagonal: this fraction of its mean diagonal (the paper's dampening)
BLOCK = 128  # columns per lazily updated block
F16_WEIGHT_LIMIT = 60000.0  # compensated weights beyond this saturate when the scales are fp16


def inverse_factor(hessian: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """U (float64, upper triangular) with UᵀU = (H + damp·mean(diag H)·I)⁻¹.

    An input channel that was never active (H[j, j] = 0) gets the dampening alone. Should the
    factorisation fail for rounding reasons, the dampening grows tenfold (at most three times)."""
    h = np.array(hessian, dtype=np.float64)
    k = h.shape[0]
    if h.shape != (k, k) or not np.isfinite(h).all():
        raise ExmyError(f"--rounding gptq: the Hessian is not a finite {k}x{k} matrix")
    mean = float(np.mean(np.diagonal(h)))
    base = mean if mean > 0 else 1.0
    for attempt in range(4):
        damped = h.copy()
        damped[np.diag_indices(k)] += damp * 10**attempt * base
        try:  # H = RRᵀ with R upper (Cholesky of H with the order of rows and columns reversed), U = R⁻¹
            upper = np.linalg.cholesky(damped[::-1, ::-1])[::-1, ::-1]
            return np.triu(np.linalg.inv(upper))
        except np.linalg.LinAlgError:
            continue
    raise ExmyError("--rounding gptq: the calibration Hessian is not positive definite even after dampening")


_RECENT: list[tuple[np.ndarray, np.ndarray]] = []  # (Hessian, its factor), most recent first


def cached_factor(hessian: np.ndarray) -> np.ndarray:
    """inverse_factor, computed once for the linears that share one Hessian (q/k/v, gate/up: the
    same array object), which a shard holds close together."""
    for h, factor in _RECENT:
        if h is hessian:
            return factor
    factor = inverse_factor(hessian)
    _RECENT.insert(0, (hessian, factor))
    del _RECENT[4:]
    return factor


def block_starts(k: int, g: int, share: int, block: int = BLOCK) -> list[int]:
    """Columns where a block begins: every share block holding a scale group's first column
    (so that the group's weights are up to date when its scale is set), and at most ``block``
    columns apart (in whole share blocks)."""
    step = max(share, block // share * share)
    starts = {c // share * share for c in range(0, k, g)} | set(range(0, k, step))
    return sorted(starts)


def gptq_rows(x: np.ndarray, fmt: ExMy, g: int, scale_dtype: str, factor: np.ndarray, clip_search: bool = False,
              importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float32 [R, K] -> (codes [R, K] uint8, scales [R, ngroups] float32), as quantize_rows, with
    the rounding errors compensated through ``factor`` (:func:`inverse_factor` of the Hessian)."""
    rows, k = x.shape
    w = x.astype(np.float64)
    ngroups = -(-k // g)
    codes = np.empty((rows, k), dtype=np.uint8)
    scales = np.empty((rows, ngroups), dtype=np.float32)
    col_scale = np.empty((rows, k), dtype=np.float64)  # each column's scale, filled as groups are entered
    diag = np.diagonal(factor)
    starts = block_starts(k, g, fmt.share)
    for a, b in zip(starts, starts[1:] + [k]):
        for j in range(-(-a // g), min(-(-(a + fmt.share) // g), ngroups)):  # groups starting in a's share block
            lo, hi = j * g, min((j + 1) * g, k)
            current = w[:, lo:hi].astype(np.float32)
            if scale_dtype == "F16":
                np.clip(current, -F16_WEIGHT_LIMIT, F16_WEIGHT_LIMIT, out=current)
            part = None if importance is None else importance[lo:hi]
            _, s = quantize_rows(current, fmt, hi - lo, scale_dtype, clip_search, part)
            scales[:, j] = s[:, 0]
            col_scale[:, lo:hi] = s[:, :1]
        err = np.empty((rows, b - a))
        for u in range(a, b, fmt.share):
            v = min(u + fmt.share, b)
            if fmt.share == 1:
                codes[:, u], err[:, u - a] = _round_columns(w[:, u:v], col_scale[:, u:v], fmt, factor[u:v, u:v],
                                                            diag[u:v], None)
            else:
                tries = [_round_columns(w[:, u:v], col_scale[:, u:v], fmt, factor[u:v, u:v], diag[u:v], bit)
                         for bit in (0, 1)]
                one = (np.square(tries[1][1]).sum(1) < np.square(tries[0][1]).sum(1))[:, None]
                codes[:, u:v] = np.where(one, tries[1][0], tries[0][0])
                err[:, u - a:v - a] = np.where(one, tries[1][1], tries[0][1])
            if v < b:
                w[:, v:b] -= err[:, u - a:v - a] @ factor[u:v, v:b]
        if b < k:
            w[:, b:] -= err @ factor[a:b, b:]
    return codes, scales


def _round_columns(w: np.ndarray, scale: np.ndarray, fmt: ExMy, factor: np.ndarray, diag: np.ndarray, bit):
    """Round the columns of w [R, n] in order, each error pushed onto the later ones (``factor``:
    U restricted to these columns). ``bit`` None: nearest codes; 0/1: nearest codes with that last
    bit. Returns (codes [R, n] (squeezed for n = 1), scaled errors [R, n]); w is left unchanged."""
    rows, n = w.shape
    w = w.copy()
    codes = np.empty((rows, n), dtype=np.uint8)
    err = np.empty((rows, n))
    for t in range(n):
        y = (w[:, t] / scale[:, t]).astype(np.float32)
        codes[:, t] = fmt.encode_nearest(y) if bit is None else fmt.nearest_with_last_bit(y, bit)
        # measured on the float32 y that was rounded, as nearest rounding measures the shared bit's error
        err[:, t] = (y - fmt.table[codes[:, t]]) * scale[:, t] / diag[t]
        if t + 1 < n:
            w[:, t + 1:] -= np.outer(err[:, t], factor[t, t + 1:])
    return (codes[:, 0], err[:, 0]) if n == 1 and bit is None else (codes, err)
