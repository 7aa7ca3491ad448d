"""Peer weight quantizers as rows of `exmyconv bench --quality`: NF4, HQQ and GPTQ, fake-quantized.

Each peer quantizes the same source weights exmyconv quantizes (:func:`compare.quantized_shapes`)
and hands back the weights its checkpoint would dequantize to (float32); the model is then
measured like every other row. ``storage_bits`` counts everything the peer's checkpoint stores for
one tensor; ``nominal_bits`` leaves out per-tensor constants (NF4's two code tables).

- ``nf4-b64``: bitsandbytes NF4, blocks of 64 consecutive elements of the flattened tensor, double
  quantization (``compress_statistics=True``): 4-bit code per weight; per block an absmax, stored as
  an 8-bit code of the dynamic map after subtracting the tensor's mean absmax (one fp32 offset), with
  one fp32 absmax per 256 blocks; plus the 16-entry NF4 table and the 256-entry dynamic map (fp32)
  that bitsandbytes serializes with each tensor. With bitsandbytes importable its own CPU path
  runs; without it :func:`nf4_fake_quantize`, written here from the published definition (QLoRA),
  which gives the same weights (tests/test_quality_peers.py compares them where bitsandbytes runs).
- ``hqq4-gG``: HQQ (``pip install hqq``), data-free, 4 bits, its default config for that group size
  (``BaseQuantizeConfig(nbits=4, group_size=G)``: half-quadratic optimized scale and zero, zero point
  rounded, groups of G consecutive elements along rows); scale and zero stored in the fp16 compute
  dtype: 4 + 32/G bits. Only when hqq imports.
- ``gptq4-g128``: GPTQ (Frantar et al. 2022), written here (:func:`gptq`): integer int4 asymmetric,
  groups of 128 in activation order (``desc_act``), Hessian XᵀX/n from the source model's Linear
  inputs on the calibration text (convert.calibration), the converter's dampening and inverse-Hessian
  factor (convert.gptq), lazy batches of 128
  columns. Each group's scale and zero point follow :class:`baselines.IntScheme` (zero-including
  range, fp16 scale, integer zero). Stored as GPTQ checkpoints store it: 4-bit codes, per group an
  fp16 scale and a 4-bit zero point, and a 32-bit ``g_idx`` per input column. Needs ``--calibration``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch

from ..convert.gptq import BLOCK, inverse_factor
from ..errors import ExmyError
from .baselines import IntScheme

# NF4's 16 values as published (QLoRA, Dettmers et al. 2023, appendix E), which bitsandbytes uses.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230731010437, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
NF4_BLOCK = 64
NESTED_BLOCK = 256  # blocks of absmax values per fp32 absmax of the double quantization
FP32_BITS = 32
_NAME = re.compile(r"(nf4)-b(\d+)|(hqq4)-g(\d+)|(gptq4)-g(\d+)")


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers et al. 2022, dynamic tree quantization), sorted.

    Per decade 10^(e-6), e = 0..6: the midpoints of 2^e equal steps of [0.1, 1], times 10^(e-6),
    with both signs (254 values); plus 0 and 1.
    """
    values = [0.0, 1.0]
    for e in range(7):
        edges = np.linspace(0.1, 1.0, 2**e + 1, dtype=np.float32)
        mids = (edges[:-1] + edges[1:]) / np.float32(2)
        values += list(mids * np.float32(10.0 ** (e - 6))) + list(-mids * np.float32(10.0 ** (e - 6)))
    return np.sort(np.array(values, np.float32))


def _blockwise_codes(values: np.ndarray, block: int, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat float32 values -> (nearest-table-entry codes of value/absmax per block, absmax per block)."""
    n = values.size
    blocks = -(-n // block)
    grouped = np.pad(values, (0, blocks * block - n)).reshape(blocks, block)
    absmax = np.abs(grouped).max(axis=1)
    scaled = np.clip(grouped * (np.float32(1) / np.maximum(absmax, np.float32(1e-38)))[:, None], -1, 1)
    codes = np.searchsorted((table[:-1] + table[1:]) / np.float32(2), scaled.reshape(-1)[:n], side="left")
    return codes.astype(np.uint8), absmax


def nf4_fake_quantize(w: np.ndarray) -> np.ndarray:
    """NF4 with blocks of 64 and double-quantized absmax, quantized and dequantized (float32)."""
    flat = np.asarray(w, np.float32).reshape(-1)
    codes, absmax = _blockwise_codes(flat, NF4_BLOCK, NF4)
    offset = np.float32(absmax.astype(np.float64).mean())
    dmap = dynamic_map()
    absmax_codes, nested = _blockwise_codes(absmax - offset, NESTED_BLOCK, dmap)
    absmax_hat = dmap[absmax_codes] * np.repeat(nested, NESTED_BLOCK)[:absmax.size] + offset
    return (NF4[codes] * np.repeat(absmax_hat, NF4_BLOCK)[:flat.size]).reshape(np.shape(w)).astype(np.float32)


def nf4_bits(numel: int, tables: bool = True) -> int:
    """Bits bitsandbytes stores for one NF4-b64 double-quantized tensor: codes (packed in bytes), 8-bit
    absmax per block, fp32 absmax per 256 blocks, the fp32 offset, and (tables) its 16 + 256 fp32 code tables."""
    blocks = -(-numel // NF4_BLOCK)
    bits = 8 * -(-numel // 2) + 8 * blocks + FP32_BITS * (-(-blocks // NESTED_BLOCK) + 1)
    return bits + (FP32_BITS * (NF4.size + 256) if tables else 0)


def _bnb_nf4_fake_quantize(w: np.ndarray) -> np.ndarray:
    import bitsandbytes.functional as bnbf

    tensor = torch.from_numpy(np.ascontiguousarray(w, np.float32))
    packed, state = bnbf.quantize_4bit(tensor, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).float().numpy()


def hqq_fake_quantize(w: np.ndarray, group: int) -> tuple[np.ndarray, int]:
    """HQQ 4-bit with its default config for this group size, on the CPU; (weights, stored bits)."""
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    if w.size % group:
        raise ExmyError(f"hqq4-g{group}: HQQ needs the element count ({w.size}) divisible by the group size")
    params = BaseQuantizeConfig(nbits=4, group_size=group)["weight_quant_params"]
    packed, meta = Quantizer.quantize(torch.from_numpy(np.ascontiguousarray(w, np.float32)), **params,
                                      compute_dtype=torch.float16, device="cpu")
    scale, zero = meta["scale"].half(), meta["zero"].half()  # HQQLinear keeps them in the compute dtype
    codes = Quantizer.unpack[meta["packing"]](packed, dtype=torch.float32)[:scale.shape[0]]
    out = ((codes - zero.float()) * scale.float()).reshape(w.shape)
    bits = 8 * packed.numel() * packed.element_size() + 16 * (scale.numel() + zero.numel())
    return out.numpy(), bits


# --------------------------------------------------------------------------- GPTQ


def gptq(w: np.ndarray, hessian: np.ndarray, scheme: IntScheme, block: int = BLOCK, act_order: bool = True) -> np.ndarray:
    """GPTQ of one weight [N, K] with the Hessian [K, K] of its inputs; the dequantized weights (float32).

    Columns go in order of decreasing Hessian diagonal (act_order) or as they are; each group of
    ``scheme.group_size`` columns in that order gets its scale and zero point from its current
    (error-updated) values; each column's rounding error is spread over the columns not yet quantized
    through the inverse-Hessian factor of the converter's GPTQ (convert.gptq.inverse_factor: its
    dampening), within a block of columns at once and to the later columns once per block (lazy
    batch updates). float64 throughout. Input channels that were never active get zero weights.
    """
    weight = np.array(w, np.float64)
    h = np.array(hessian, np.float64)
    k = weight.shape[1]
    weight[:, np.diag(h) == 0] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    weight = weight[:, order]
    hinv = inverse_factor(h[np.ix_(order, order)])  # upper U with H^-1 = U^T U
    group = scheme.group_size or k
    qmax = 2**scheme.bits - 1
    out = np.zeros_like(weight)
    scale = zero = None
    for start in range(0, k, block):
        stop = min(start + block, k)
        chunk = weight[:, start:stop].copy()
        errors = np.zeros_like(chunk)
        hinv_chunk = hinv[start:stop, start:stop]
        for i in range(stop - start):
            if (start + i) % group == 0:  # the group's parameters from its columns as they are now
                members = np.concatenate([chunk[:, i:], weight[:, stop:]], axis=1)[:, :group]
                _, s, z = scheme.quantize(members.astype(np.float32))
                scale, zero = s[:, 0].astype(np.float64), z[:, 0].astype(np.float64)
            x = chunk[:, i]
            q = (np.clip(np.rint(x / scale) + zero, 0, qmax) - zero) * scale
            out[:, start + i] = q
            err = (x - q) / hinv_chunk[i, i]
            chunk[:, i:] -= np.outer(err, hinv_chunk[i, i:])
            errors[:, i] = err
        weight[:, stop:] -= errors @ hinv[start:stop, stop:]
    return out[:, np.argsort(order)].astype(np.float32)


def gptq_bits(shape: tuple[int, ...], scheme: IntScheme) -> int:
    """GPTQ checkpoint bits: 4-bit codes, fp16 scale + B-bit zero per group, int32 g_idx per input column."""
    n, k = int(np.prod(shape[:-1])), shape[-1]
    _, groups = scheme.groups(k)
    return n * k * scheme.bits + n * groups * (16 + scheme.bits) + 32 * k


# --------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Peer:
    """One peer scheme: 'nf4' (block), 'hqq4' (group) or 'gptq4' (group)."""

    kind: str
    size: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{'b' if self.kind == 'nf4' else 'g'}{self.size}"

    @property
    def needs_calibration(self) -> bool:
        return self.kind == "gptq4"

    def unavailable(self) -> str:
        """Why this peer cannot run here ('' when it can)."""
        if self.kind == "hqq4":
            try:
                import hqq.core.quantize  # noqa: F401
            except Exception as err:
                return f"hqq is not importable ({type(err).__name__}: {err}); pip install hqq"
        return ""

    def implementation(self) -> str:
        if self.kind == "nf4":
            return f"bitsandbytes {metadata.version('bitsandbytes')}" if _bnb_works() else \
                "exmyconv's NF4 (bitsandbytes not importable)"
        if self.kind == "hqq4":
            return f"hqq {metadata.version('hqq')}"
        return "exmyconv's GPTQ (bench/peers_quality.py)"

    def fake_quantize(self, name: str, w: np.ndarray, hessian: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
        """w [..., K] -> (dequantized weights, stored bits, nominal bits)."""
        if self.kind == "nf4":
            out = _bnb_nf4_fake_quantize(w) if _bnb_works() else nf4_fake_quantize(w)
            return out, nf4_bits(w.size), nf4_bits(w.size, tables=False)
        if self.kind == "hqq4":
            out, bits = hqq_fake_quantize(w, self.size)
            return out, bits, bits
        scheme = IntScheme(4, self.size)
        bits = gptq_bits(w.shape, scheme)
        return gptq(w.reshape(-1, w.shape[-1]), hessian, scheme).reshape(w.shape), bits, bits


_BNB: list[bool] = []


def _bnb_works() -> bool:
    """bitsandbytes imports and its NF4 runs on the CPU (checked once)."""
    if not _BNB:
        try:
            import bitsandbytes.functional  # noqa: F401

            _bnb_nf4_fake_quantize(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64))
            _BNB.append(True)
        except Exception:
            _BNB.append(False)
    return _BNB[0]


def parse(name: str) -> Peer | None:
    """'nf4-b64', 'hqq4-g64', 'gptq4-g128' -> Peer; None for a name that is no peer's."""
    m = _NAME.fullmatch(name.strip().lower())
    if not m:
        return None
    kind, size = next((m[i], int(m[i + 1])) for i in (1, 3, 5) if m[i])
    if kind == "nf4" and size != NF4_BLOCK:
        raise ExmyError(f"{name}: NF4 is measured with blocks of {NF4_BLOCK} only (nf4-b64)")
    if size < 1:
        raise ExmyError(f"{name}: the group size must be positive")
    return Peer(kind, size)


def default_names(calibration: bool) -> list[str]:
    """The peers `bench --quality` adds by default: those that run here (GPTQ with a calibration text)."""
    peers = [Peer("nf4", 64), Peer("hqq4", 64), Peer("hqq4", 128)] + ([Peer("gptq4", 128)] if calibration else [])
    return [p.name for p in peers if not p.unavailable()]
