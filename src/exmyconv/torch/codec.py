"""The torch codec: ExMy encode and decode on torch tensors (CPU or CUDA), one for every torch user.

The same arithmetic as the numpy reference in :mod:`exmyconv.format` (formats/SPEC.md sections 1-3):
the format search measures errors with :func:`reconstruct`, loading and the CPU compute path decode
with :func:`dequantize`. ``tests/test_torch_codec.py`` checks both against the reference bit for bit.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from ..errors import ExmyError
from ..format.exmy import ExMy, get_format
from ..format.pack import padded_k, plane_shifts, row_bytes, shared_plane_bytes
from ..format.quant import FP16_MAX, SMALLEST_NORMAL, groups_of

CHUNK_ELEMENTS = 1 << 20  # weights dequantized per step: bounds the float32 temporaries (~4 MB)
TORCH_DTYPE = {"F16": torch.float16, "BF16": torch.bfloat16}
SCALE_NAME = {t: name for name, t in TORCH_DTYPE.items()}  # stored scale dtypes (and the kernels' x dtypes)

# ----------------------------------------------------------------------------- decode

def scale_values(scale: torch.Tensor, scale_exp: int | None) -> torch.Tensor:
    """Stored scales as the decoders take them: 8-bit ones (float8_e4m3fn, or its raw uint8 bytes;
    SPEC section 2) times 2^scale_exp as float32 (exact); 16-bit ones as they are."""
    if scale_exp is None:
        return scale
    if scale.dtype == torch.uint8:
        scale = scale.view(torch.float8_e4m3fn)
    return scale.float() * 2.0 ** scale_exp


def widened_scales(scale: torch.Tensor, scale_exp: int, fmt: ExMy) -> torch.Tensor:
    """8-bit scales as fp16 or bf16 by :func:`scale_dtype`'s rule (format.quant.choose_scale_dtype's):
    exact either way (4 significant bits), for the GPU kernels, which read 16-bit scales."""
    return narrowed_scales(scale_values(scale, scale_exp), fmt)


def narrowed_scales(values: torch.Tensor, fmt: ExMy) -> torch.Tensor | None:
    """float32 scale values as fp16 or bf16 by :func:`scale_dtype`'s rule where that dtype holds every
    one exactly (always for 8-bit scales' values), else None."""
    narrow = values.to(TORCH_DTYPE[scale_dtype(values * fmt.max, fmt)])  # (values * max / max is exact)
    return narrow if torch.equal(narrow.float(), values.float()) else None


_TABLES: dict = {}
_TABLES_LOCK = threading.Lock()


def _table(fmt: ExMy, device: torch.device) -> torch.Tensor:
    """float32 value of every code of fmt, on device (cached: at most 256 floats per format)."""
    key = (fmt.e, fmt.m, str(device))
    table = _TABLES.get(key)
    if table is None:
        with _TABLES_LOCK:
            table = _TABLES.setdefault(key, torch.from_numpy(fmt.table.copy()).to(device))
    return table


def unpack_codes(packed: torch.Tensor, fmt: ExMy, k: int) -> torch.Tensor:
    """uint8 payload [R, row_bytes] -> uint8 codes [R, k] (SPEC section 3), on packed's device."""
    rows, nbytes = packed.shape
    if nbytes != row_bytes(fmt, k):
        raise ExmyError(f"payload rows have {nbytes} bytes; {fmt.name} with K={k} needs {row_bytes(fmt, k)}")
    kp = padded_k(k)
    codes = None
    offset = 0
    for w, shift in plane_shifts(fmt):
        size = kp * w // 8
        plane = packed[:, offset:offset + size]
        offset += size
        field = plane if w == 8 else _split_fields(plane, w).reshape(rows, kp)
        field = field << shift if shift else field
        codes = field if codes is None else codes | field
    if fmt.share > 1:  # shared plane: bit j is the last code bit of elements share*j ... share*j + share-1
        bits = _split_fields(packed[:, offset:offset + shared_plane_bytes(fmt, k)], 1).reshape(rows, -1)
        codes = codes | bits.repeat_interleave(fmt.share, dim=1)[:, :kp]  # the planes held code >> 1
    return codes[:, :k]


def _split_fields(plane: torch.Tensor, w: int) -> torch.Tensor:
    """[R, n] bytes of a w-bit plane -> [R, n, 8 // w] fields: element i at bits (i*w) % 8 of byte (i*w) // 8."""
    mask = (1 << w) - 1
    plane = plane.contiguous()  # a column slice of the payload: strided uint8 ops are slow
    return torch.stack([(plane >> (w * j)) & mask if j else plane & mask for j in range(8 // w)], dim=-1)


def dequantize_rows(packed: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor, fmt: ExMy | str, k: int,
                    group_size: int | None, dtype: torch.dtype, scale_exp: int | None = None) -> torch.Tensor:
    """Rows ``ids`` (any shape) of a packed table [R, row_bytes] + stored scales [R, ngroups] (see
    :func:`scale_values`) -> [*ids.shape, k] of ``dtype``: an embedding lookup that decodes only the rows
    it returns, bitwise those rows of :func:`dequantize`'s table (rows are packed and scaled on their
    own). ``index_select`` refuses ids out of range, as ``nn.Embedding`` does, without a host sync."""
    flat = ids.reshape(-1)
    rows = dequantize(packed.index_select(0, flat), scale_values(scale.index_select(0, flat), scale_exp), fmt, k,
                      group_size, dtype)
    return rows.view(*ids.shape, k)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, fmt: ExMy | str, k: int, group_size: int | None,
               dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed payload [..., row_bytes] + scales [..., ngroups] -> weights [..., k] of ``dtype``.

    Exactly formats/SPEC.md section 2: decode(code) * scale in float32 (exact), then rounded to
    ``dtype`` to nearest even; bit-identical to ``exmyconv.io.checkpoint.Checkpoint.dequantize``.
    Runs on the tensors' device (CPU or CUDA), a chunk of rows at a time so that the float32
    temporaries stay small; the result is the only full-size allocation (or ``out``).
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    g, ngroups = groups_of(k, group_size)
    lead = tuple(packed.shape[:-1])
    if packed.dtype != torch.uint8 or packed.shape[-1] != row_bytes(fmt, k):
        raise ExmyError(f"packed weights must be uint8 [..., {row_bytes(fmt, k)}] for {fmt.name} with K={k}, "
                        f"got {packed.dtype} {list(packed.shape)}")
    if tuple(scale.shape) != (*lead, ngroups):
        raise ExmyError(f"scales must have shape {[*lead, ngroups]}, got {list(scale.shape)}")
    rows = 1
    for d in lead:
        rows *= d
    packed2 = packed.reshape(rows, -1)
    scale2 = scale.reshape(rows, ngroups)
    if out is None:
        out = torch.empty((*lead, k), dtype=dtype, device=packed.device)
    out2 = out.view(rows, k)
    table = _table(fmt, packed.device)
    ragged = ngroups > 1 and ngroups * g != k  # a shorter last group: scales gathered per element
    group_of = torch.arange(k, device=packed.device) // g if ragged else None
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        codes = unpack_codes(packed2[r0:r1], fmt, k)
        values = table.index_select(0, codes.reshape(-1).int()).view(r1 - r0, k)  # float32, exact
        s = scale2[r0:r1].float()  # fp16/bf16 -> float32 is exact
        # decode(code) * scale is exact in float32 (a <= 6-bit significand times an 11-bit one)
        if ngroups == 1:
            values *= s
        elif ragged:
            values *= s[:, group_of]
        else:
            values.view(r1 - r0, ngroups, g).mul_(s.unsqueeze(-1))
        out2[r0:r1].copy_(values)  # rounds to nearest even (no rounding for float32)
    return out



# ----------------------------------------------------------------------------- encode

def encode_nearest(fmt: ExMy, y: torch.Tensor) -> torch.Tensor:
    """ExMy.encode_nearest on a float32 tensor; int32 codes."""
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


def grouped(x: torch.Tensor, g: int, ngroups: int) -> torch.Tensor:
    rows, k = x.shape
    return torch.nn.functional.pad(x, (0, ngroups * g - k)).view(rows, ngroups, g)


def scale_dtype(amax: torch.Tensor, fmt: ExMy) -> str:
    s = (amax[amax > 0] / fmt.max).to(torch.float16).float()
    fits = bool((s >= SMALLEST_NORMAL["F16"]).all()) and bool((s * fmt.max <= FP16_MAX).all())
    return "F16" if fits else "BF16"


def scales_for(amax: torch.Tensor, fmt: ExMy, dtype: str) -> torch.Tensor:
    s = (amax / fmt.max).to(TORCH_DTYPE[dtype]).float()
    overflow = torch.isinf(s * fmt.max)
    if bool(overflow.any()):  # weights near the float32 limit: those scales one bf16 step down
        bits = s.view(torch.int32) >> 16
        s = torch.where(overflow, ((bits - 1) << 16).view(torch.float32), s)
    return s.clamp(min=SMALLEST_NORMAL[dtype])


def reconstruct(x: torch.Tensor, fmt: ExMy, g: int, s: torch.Tensor, importance) -> torch.Tensor:
    """Quantize-dequantize float32 [R, K] with scales s [R, ngroups] (the writer's arithmetic)."""
    rows, k = x.shape
    per_element = s.repeat_interleave(g, dim=1)[:, :k]
    y = (grouped(x, g, s.shape[1]) / s[..., None]).reshape(rows, -1)[:, :k]
    weight = None
    if fmt.share > 1:
        weight = per_element.square() if importance is None else per_element.square() * importance
    codes = encode(fmt, y, weight)
    return torch.as_tensor(fmt.table, device=x.device)[codes] * per_element
