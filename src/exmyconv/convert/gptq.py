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

One algorithm, two array libraries (:class:`Numpy` here, convert/gptq_torch.py for a GPU), float64,
with the same codes and scales on both: every operation is elementwise (rounded once, the same on
any IEEE machine) except the updates through matrix products, whose sums a BLAS adds in its own
order; there the factor and each row of the errors are rounded to a fixed number of bits
(FACTOR_BITS, ERR_BITS) so that every product and partial sum is exact and the order cannot matter.
Deterministic.
"""
from __future__ import annotations

import numpy as np

from ..errors import ExmyError
from ..format.exmy import ExMy
from ..format.quant import quantize_rows

DAMP = 0.01  # added to H's diagonal: this fraction of its mean diagonal (the paper's dampening)
BLOCK = 128  # columns per lazily updated block
F16_WEIGHT_LIMIT = 60000.0  # compensated weights beyond this saturate when the scales are fp16
# Bits kept of the factor (below its largest entry) and of a row of errors (below its largest):
# a product of the two is an integer multiple of one unit below 2^(ERR_BITS + FACTOR_BITS), and a sum
# of BLOCK of them stays below 2^53, so float64 adds them exactly. Their relative error (< 10⁻⁷) is
# far below any grid step.
FACTOR_BITS, ERR_BITS = 24, 21
assert FACTOR_BITS + ERR_BITS + (BLOCK - 1).bit_length() <= 53
_EXPONENT = 0x7FF0000000000000  # float64 exponent field


def inverse_factor(hessian: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """U (float64, upper triangular) with UᵀU = (H + damp·mean(diag H)·I)⁻¹, its entries multiples
    of 2^-FACTOR_BITS times the largest one's power of two.

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
            u = np.triu(np.linalg.inv(upper))
        except np.linalg.LinAlgError:
            continue
        unit = _units(NUMPY, np.abs(u).max(keepdims=True), FACTOR_BITS)
        return np.round(u / unit) * unit
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


class Numpy:
    """The array operations the algorithm needs, on numpy (the CPU); gptq_torch.Torch has the same."""

    where, round = staticmethod(np.where), staticmethod(np.round)

    @staticmethod
    def array(a: np.ndarray):
        """A float64 copy of a numpy array, in this library."""
        return np.array(a, dtype=np.float64)

    @staticmethod
    def numpy(a) -> np.ndarray:
        return a

    @staticmethod
    def copy(a):
        return a.copy()

    @staticmethod
    def zeros_like(a):
        return np.zeros_like(a)

    @staticmethod
    def float32(a):
        return a.astype(np.float32)

    @staticmethod
    def codes(rows: int, k: int):
        return np.empty((rows, k), dtype=np.uint8)

    @staticmethod
    def table(fmt: ExMy):
        return fmt.table

    @staticmethod
    def encode_nearest(fmt: ExMy, y):
        return fmt.encode_nearest(y)

    @staticmethod
    def nearest_with_last_bit(fmt: ExMy, y, bit: int):
        return fmt.nearest_with_last_bit(y, bit)

    @staticmethod
    def row_amax(a):
        return np.abs(a).max(axis=1, keepdims=True)

    @staticmethod
    def power_of_two(a):
        """2^floor(log2 a) of float64 a >= 0 (0 for 0 and subnormals), from the exponent bits."""
        return (a.view(np.int64) & _EXPONENT).view(np.float64)


NUMPY = Numpy()


def _units(ops, amax, bits: int):
    """The power of two that leaves ``bits`` bits below each amax (1 where amax is 0)."""
    top = ops.power_of_two(amax)
    return ops.where(top > 0, top * 2.0 ** (1 - bits), 1.0)


def _product(ops, err, factor):
    """err @ factor, exact: each row of err rounded to ERR_BITS below its largest (factor: already
    rounded). One column: single products, rounded once, nothing to round before."""
    if err.shape[1] == 1:
        return err @ factor
    unit = _units(ops, ops.row_amax(err), ERR_BITS)
    return (ops.round(err / unit) * unit) @ factor


def gptq_rows(x: np.ndarray, fmt: ExMy, g: int, scale_dtype: str, factor: np.ndarray, clip_search: bool = False,
              importance: np.ndarray | None = None, ops=NUMPY):
    """float32 [R, K] -> (codes [R, K] uint8, scales [R, ngroups] float32), as quantize_rows, with
    the rounding errors compensated through ``factor`` (:func:`inverse_factor` of the Hessian).
    ``ops``: the array library (codes come back in it, scales in numpy)."""
    rows, k = x.shape
    w = ops.array(x)
    u_full = ops.array(factor)
    diag = u_full.diagonal()
    ngroups = -(-k // g)
    codes = ops.codes(rows, k)
    scales = np.empty((rows, ngroups), dtype=np.float32)
    col_scale = ops.zeros_like(w)  # each column's scale, filled as groups are entered
    for a, b in zip(block_starts(k, g, fmt.share), block_starts(k, g, fmt.share)[1:] + [k]):
        for j in range(-(-a // g), min(-(-(a + fmt.share) // g), ngroups)):  # groups starting in a's share block
            lo, hi = j * g, min((j + 1) * g, k)
            current = ops.numpy(ops.float32(w[:, lo:hi]))
            if scale_dtype == "F16":
                current = np.clip(current, -F16_WEIGHT_LIMIT, F16_WEIGHT_LIMIT)
            part = None if importance is None else importance[lo:hi]
            _, s = quantize_rows(current, fmt, hi - lo, scale_dtype, clip_search, part)
            scales[:, j] = s[:, 0]
            col_scale[:, lo:hi] = ops.array(s[:, :1])
        err = ops.zeros_like(w[:, a:b])
        for u in range(a, b, fmt.share):
            v = min(u + fmt.share, b)
            args = (ops, w[:, u:v], col_scale[:, u:v], fmt, u_full[u:v, u:v], diag[u:v])
            if fmt.share == 1:
                codes[:, u:v], err[:, u - a:v - a] = _round_columns(*args, None)
            else:
                tries = [_round_columns(*args, bit) for bit in (0, 1)]
                one = (_row_sum_of_squares(tries[1][1]) < _row_sum_of_squares(tries[0][1]))[:, None]
                codes[:, u:v] = ops.where(one, tries[1][0], tries[0][0])
                err[:, u - a:v - a] = ops.where(one, tries[1][1], tries[0][1])
            if v < b:
                w[:, v:b] -= _product(ops, err[:, u - a:v - a], u_full[u:v, v:b])
        if b < k:
            w[:, b:] -= _product(ops, err, u_full[a:b, b:])
    return codes, scales


def _row_sum_of_squares(a):
    """Σ_c a[:, c]², added in column order (the same sums for every library)."""
    total = a[:, 0] * a[:, 0]
    for c in range(1, a.shape[1]):
        total = total + a[:, c] * a[:, c]
    return total


def _round_columns(ops, w, scale, fmt: ExMy, factor, diag, bit):
    """Round the columns of w [R, n] in order, each error pushed onto the later ones (``factor``:
    U restricted to these columns). ``bit`` None: nearest codes; 0/1: nearest codes with that last
    bit. Returns (codes [R, n], scaled errors [R, n]); w is left unchanged."""
    rows, n = w.shape
    w = ops.copy(w)
    codes = ops.codes(rows, n)
    err = ops.zeros_like(w)
    table = ops.table(fmt)
    for t in range(n):
        y = ops.float32(w[:, t] / scale[:, t])
        code = ops.encode_nearest(fmt, y) if bit is None else ops.nearest_with_last_bit(fmt, y, bit)
        codes[:, t] = code
        # measured on the float32 y that was rounded, as nearest rounding measures the shared bit's error
        err[:, t] = (y - table[code]) * scale[:, t] / diag[t]
        if t + 1 < n:
            w[:, t + 1:] -= err[:, t, None] * factor[t, None, t + 1:]
    return codes, err

