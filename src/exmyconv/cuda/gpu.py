"""CUDA kernels for ExMy weights, loaded at run time through CuPy (``pip install exmyconv[gpu]``).

The CUDA C sources live in ``kernels/`` (shipped in the wheel as ``exmyconv/kernels``). Each
source is compiled per format with NVRTC for the current device's architecture (``sm_90`` on
H100/H200) the first time it is needed; CuPy caches the binaries on disk (``CUPY_CACHE_DIR``,
default ``~/.cupy/kernel_cache``) and this module keeps them for the process.

Public API::

    available() -> bool
    unavailable_reason() -> str                 # "" when available
    dequantize(payload, scales, scale_dtype, fmt, k, group_size, out_dtype="F16", out=None) -> cupy array
    upload(qtensor) -> GpuWeight                # weights resident on the GPU, for gemv
    gemv(x, weight, out=None) -> y              # y = x @ W.T, x [B, K] fp16/bf16, any B (16 per launch)
    to_torch(array, dtype) -> torch.Tensor      # zero-copy view of a cupy result

``dequantize`` is bit-exact with ``QTensor.dequantize`` (formats/SPEC.md section 2): fp16 output is a
cupy float16 array, bf16 output a cupy uint16 array of bf16 bit patterns (cupy has no bfloat16),
fp32 output a float32 array; shape ``[..., K]``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import ExmyError
from ..format.exmy import ExMy, get_format
from ..format.pack import padded_k, row_bytes
from ..format.quant import FP16_MAX, groups_of
from .device import _cupy, available, device_info, pdl_available, sm_count, unavailable_reason  # noqa: F401 (API)

OUT_DTYPES = ("F16", "BF16", "F32")
BLOCK = 256           # dequant threads per block
DEQUANT_UNITS = 2     # (row, 32-element chunk) units per dequant thread (kernels/dequant.cu)
GEMV_WARPS = 8        # must match kernels/gemv.cu (GEMV_WARPS)
GEMV_ROWS = 16        # weight rows per mma tile (a warp takes gemv_tile_rows: one or two tiles)
MAX_BATCH = 16        # rows of x per GEMV launch


# ----------------------------------------------------------------------------- kernel sources

def kernel_dir() -> Path:
    """Folder of the CUDA sources: inside the installed package, else the source tree's kernels/."""
    try:
        from importlib.resources import files

        packaged = Path(str(files("exmyconv") / "kernels"))
        if (packaged / "exmy_decode.cuh").is_file():
            return packaged
    except Exception:  # pragma: no cover - exotic importers
        pass
    repo = Path(__file__).resolve().parents[3] / "kernels"  # editable install / PYTHONPATH=src
    if (repo / "exmy_decode.cuh").is_file():
        return repo
    raise ExmyError("exmyconv's CUDA sources (kernels/) are missing from this installation")


def kernel_source(name: str) -> str:
    """A kernel source with the shared header inlined (so CuPy's cache key covers the header)."""
    folder = kernel_dir()
    header = (folder / "exmy_decode.cuh").read_text().replace("#pragma once", "")
    text = (folder / name).read_text()
    return text.replace('#include "exmy_decode.cuh"', header)


@functools.lru_cache(maxsize=None)
def _module(source: str, e: int, m: int, defines: tuple = (), share: int = 1, instance: str | None = None):
    """kernels/`source` compiled for one format; `instance`: the one template instantiation to build
    (a C++ name such as "exmy_gemv<3, 0, true, 0, 2, false>"), else the source's extern "C" kernels."""
    cupy = _cupy()
    options = ("--std=c++17", f"-DEXMY_E={e}", f"-DEXMY_M={m}", *(f"-D{d}" for d in defines))
    if share > 1:  # shared format eXmYsk (kernels/exmy_decode.cuh)
        options += (f"-DEXMY_SHARE={share}",)
    # CuPy compiles with NVRTC for the current device (-arch=sm_XX, a cubin) and caches on disk.
    return cupy.RawModule(code=kernel_source(source), options=options,
                          name_expressions=(instance,) if instance else None)


def kernel(source: str, name: str, fmt: ExMy, defines: tuple = ()):
    """The compiled extern "C" kernel `name` of kernels/`source` for `fmt` (a cupy RawKernel)."""
    return _module(source, fmt.e, fmt.m, tuple(defines), fmt.share).get_function(name)


def order_defines(order: str) -> tuple:
    """The kernel defines that read a payload in `order` ("row": none; "tile": EXMY_TILE)."""
    if order not in ("row", "tile"):
        raise ExmyError(f"payload order {order!r}: 'row' or 'tile'")
    return ("EXMY_TILE=1",) if order == "tile" else ()


def supports_dequant(fmt) -> bool:
    """True when dequantize handles `fmt` bit-exactly on the GPU (every ExMy and every eXmYsk)."""
    fmt = _fmt(fmt)
    return 1 <= fmt.e <= 5 and fmt.bits <= 8 and 1 <= fmt.share <= 8


def supports(fmt) -> bool:
    """True when the fused GEMV (gemv/upload) handles `fmt`: every unshared ExMy, and the shared
    formats whose GEMV was checked on a GPU (GEMV_SHARED)."""
    fmt = _fmt(fmt)
    return supports_dequant(fmt) and (fmt.share == 1 or fmt.name in GEMV_SHARED)


def gemv_applies(fmt, x_dtype: str, rows: int) -> bool:
    """The one rule of the CUDA compute paths (ExmyLinear, PackedLinear): y = x W^T runs the fused GEMV
    for fp16/bf16 x ("F16"/"BF16") of 1..MAX_BATCH rows and a format it handles (supports); otherwise
    the weight is dequantized bit-exactly and cuBLAS multiplies."""
    return 1 <= rows <= MAX_BATCH and x_dtype in ("F16", "BF16") and supports(fmt)


# shared formats the GEMV is tested for (tests/test_gpu_kernels.py): the named ones, and e2m1s4, the
# 3.25-bit candidate of `--format auto` (so no layer auto chooses falls back to the torch decoder)
GEMV_SHARED = ("e2m1s4", "e2m2s4", "e2m3s3")


def _fmt(fmt) -> ExMy:
    return fmt if isinstance(fmt, ExMy) else get_format(str(fmt))


# ----------------------------------------------------------------------------- argument handling

def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _torch_as_cupy(t):
    """A CUDA torch tensor as a cupy array of the same bytes (bf16 as uint16), no copy."""
    import torch

    cupy = _cupy()
    if not t.is_cuda:
        t = t.cuda()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return cupy.asarray(t.view(torch.int16)).view(cupy.uint16)
    return cupy.asarray(t)


def _as_device(a, dtype=None):
    cupy = _cupy()
    if _is_torch(a):
        a = _torch_as_cupy(a)
    a = cupy.asarray(a) if dtype is None else cupy.asarray(a, dtype=dtype)
    return cupy.ascontiguousarray(a)


def scale_bits(scales, scale_dtype: str):
    """Scales as a cupy uint16 array of raw fp16/bf16 bits.

    Accepts float32 values exact in scale_dtype (QTensor.scales), float16 / bfloat16 arrays, or
    uint16 bit patterns (what safetensors stores), on the host, in cupy or in torch.
    """
    cupy = _cupy()
    if scale_dtype not in ("F16", "BF16"):
        raise ExmyError(f"scale dtype must be F16 or BF16, not {scale_dtype!r}")
    if _is_torch(scales):
        import torch

        if scales.dtype in (torch.float16, torch.bfloat16):
            scales = scales.contiguous().view(torch.int16)
        scales = _torch_as_cupy(scales)
    if not isinstance(scales, cupy.ndarray):
        scales = np.asarray(scales)
        if scales.dtype.name == "bfloat16":  # ml_dtypes
            scales = scales.view(np.uint16)
    kind = np.dtype(scales.dtype)
    if kind in (np.uint16, np.int16):
        return _as_device(scales).view(cupy.uint16)
    if kind == np.float16:
        if scale_dtype != "F16":
            raise ExmyError("float16 scales given with scale dtype BF16")
        return _as_device(scales).view(cupy.uint16)
    if kind in (np.float32, np.float64):
        s = _as_device(scales, cupy.float32)
        if scale_dtype == "F16":
            return s.astype(cupy.float16).view(cupy.uint16)
        # bf16 = top half of the float32 (the values are exact bf16 numbers)
        return (s.view(cupy.uint32) >> 16).astype(cupy.uint16)
    raise ExmyError(f"cannot use scales of dtype {kind}")


ROW_ALIGN = 16  # bytes: every payload row starts 16-byte aligned (the 4-bit plane is read in 16-byte words)


def kernel_stride(rb: int) -> int:
    """Bytes between the rows the kernels read: the row's bytes (a multiple of 4 in layout 2.0)
    rounded up to ROW_ALIGN."""
    return -(-rb // ROW_ALIGN) * ROW_ALIGN


def _payload_rows(payload, fmt: ExMy, k: int):
    """A payload [..., row_bytes] as the [rows, row_bytes] cupy array the kernels read: a view with rows
    ROW_ALIGN-aligned. A torch tensor whose rows already are (torch.packed.kernel_rows lays buffers
    out that way) is used in place, whatever its row stride; other payloads whose rows are not are
    copied once into rows of kernel_stride bytes (the extra bytes are never decoded)."""
    cupy = _cupy()
    rb = row_bytes(fmt, k)
    if _is_torch(payload) and payload.is_cuda and payload.dim() >= 2 and payload.shape[-1] == rb \
            and payload.stride(-1) == 1:
        rows2 = payload.reshape(-1, rb) if payload.dim() > 2 else payload  # a view where strides allow
        if rows2.stride(0) % ROW_ALIGN == 0 and rows2.data_ptr() % ROW_ALIGN == 0 and rows2.data_ptr() \
                == payload.data_ptr() and rows2.stride(0) >= rb:
            n = rows2.shape[0]
            size = (n - 1) * rows2.stride(0) + rb if n else 0
            mem = cupy.cuda.UnownedMemory(rows2.data_ptr(), size, rows2)
            return cupy.ndarray((n, rb), cupy.uint8, cupy.cuda.MemoryPointer(mem, 0), strides=(rows2.stride(0), 1))
    if isinstance(payload, cupy.ndarray) and payload.ndim == 2 and payload.dtype == cupy.uint8 \
            and payload.shape[1] == rb and payload.strides[1] == 1 and payload.strides[0] % ROW_ALIGN == 0 \
            and payload.data.ptr % ROW_ALIGN == 0:
        return payload  # already as the kernels read it (e.g. GpuWeight.payload)
    pay = _as_device(payload).view(cupy.uint8)
    if pay.ndim < 1 or pay.shape[-1] != rb:
        return pay  # (_check_layout names the problem)
    pay = pay.reshape(-1, rb)
    if rb % ROW_ALIGN or pay.data.ptr % ROW_ALIGN:
        wide = cupy.zeros((pay.shape[0], kernel_stride(rb)), cupy.uint8)
        wide[:, :rb] = pay
        pay = wide[:, :rb]
    return pay


def _check_layout(payload, scales, fmt: ExMy, k: int, group_size: int | None):
    """Flatten to [rows, row_bytes] / [rows, ngroups] after checking the shapes (SPEC section 4)."""
    if k < 1:
        raise ExmyError(f"K must be positive, not {k}")
    g, ngroups = groups_of(k, group_size)
    rb = row_bytes(fmt, k)  # SPEC 3: Kp * b / 8, or Kp * (b - 1) / 8 + the shared plane
    if payload.ndim < 1 or payload.shape[-1] != rb:
        raise ExmyError(f"payload rows have {payload.shape[-1] if payload.ndim else 0} bytes; "
                        f"{fmt.name} with K={k} needs {rb}")
    lead = payload.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64)) if lead else 1
    if scales.size != rows * ngroups:
        raise ExmyError(f"{scales.size} scales for {rows} rows of {ngroups} groups")
    if payload.ndim != 2:
        payload = payload.reshape(rows, rb)
    return payload, scales.reshape(rows, ngroups), tuple(lead), rows, g, ngroups


# ----------------------------------------------------------------------------- dequantization

_OUT_NAME = {"F16": "o16", "BF16": "obf", "F32": "o32"}


def dequantize(payload, scales, scale_dtype: str, fmt, k: int, group_size: int | None,
               out_dtype: str = "F16", out=None, order: str = "row"):
    """Packed payload [..., row_bytes] + scales [..., ceil(K/G)] -> cupy array [..., K].

    Bit-exact with the CPU reference (QTensor.dequantize). payload: uint8 (numpy, cupy or torch);
    scales: see scale_bits; group_size: G (None or >= K: one group per row). out_dtype "F16" gives
    float16, "BF16" uint16 bf16 bit patterns, "F32" float32. `out` (optional) is a contiguous cupy
    array of that dtype and shape, or a torch CUDA tensor of the matching 16/32-bit dtype, to write
    into (tests poison it first); into a torch tensor the launch runs on torch's current stream (a
    side stream, a CUDA-graph capture), as every launch for torch buffers does (_stream_of).
    order: the payload's byte order, "row" (the file's) or "tile" (tile_order).
    """
    cupy = _cupy()
    fmt = _fmt(fmt)
    if out_dtype not in OUT_DTYPES:
        raise ExmyError(f"out_dtype must be one of {', '.join(OUT_DTYPES)}, not {out_dtype!r}")
    lead = tuple(payload.shape[:-1])
    pay = _payload_rows(payload, fmt, int(k))
    bits = scale_bits(scales, scale_dtype)
    pay, bits, _, rows, g, ngroups = _check_layout(pay, bits, fmt, int(k), group_size)
    np_out = {"F16": cupy.float16, "BF16": cupy.uint16, "F32": cupy.float32}[out_dtype]
    shape = (*lead, k)
    stream = None  # cupy's current stream
    if out is None:
        out = cupy.empty(shape, dtype=np_out)
    elif _is_torch(out):  # a torch buffer (torch's allocator: safe inside CUDA-graph capture)
        stream, out = _stream_of(out), _torch_as_cupy(out)
    if out.dtype != np_out or tuple(out.shape) != shape or not out.flags.c_contiguous:
        raise ExmyError(f"out must be a contiguous {np.dtype(np_out)} array of shape {shape}")
    plan = DequantPlan(pay, bits, scale_dtype, fmt, int(k), rows, g, ngroups, out_dtype, out, stream, order)
    plan()
    return out


class DequantPlan:
    """One dequantization launch with its arguments prepared (call it to launch; for benchmarks)."""

    def __init__(self, pay, bits, scale_dtype, fmt, k, rows, g, ngroups, out_dtype, out, stream=None, order="row"):
        self.stream = stream  # None: cupy's current stream at each call
        cpr = -(-k // 32)
        self.units = rows * cpr
        if self.units >= 2**32 - BLOCK * DEQUANT_UNITS:
            raise ExmyError("tensor too large for one launch")  # > 137 G weights
        self.name = f"exmy_dequant_s{'bf' if scale_dtype == 'BF16' else '16'}_{_OUT_NAME[out_dtype]}"
        self.fn = kernel("dequant.cu", self.name, fmt, order_defines(order)) if self.units else None
        self.args = (pay, bits, out, np.uint32(rows), np.uint32(k), np.uint32(pay.strides[0]),
                     np.uint32(ngroups), np.uint32(g))
        self.out = out

    def __call__(self):
        if self.fn is not None:
            per_block = BLOCK * DEQUANT_UNITS
            if self.stream is None:
                self.fn(((self.units + per_block - 1) // per_block,), (BLOCK,), self.args)
            else:
                with self.stream:
                    self.fn(((self.units + per_block - 1) // per_block,), (BLOCK,), self.args)
        return self.out


def to_torch(array, dtype: str | None = None):
    """A cupy result as a torch CUDA tensor (no copy); dtype "BF16" reinterprets uint16 bits."""
    import torch

    cupy = _cupy()
    if dtype == "BF16" or array.dtype == cupy.uint16:
        t = torch.as_tensor(array.view(cupy.int16), device="cuda")
        return t.view(torch.bfloat16) if dtype == "BF16" else t
    return torch.as_tensor(array, device="cuda")


# ----------------------------------------------------------------------------- GEMV

@dataclass
class GpuWeight:
    """A quantized weight [N, K] (leading dims flattened to N rows) resident on the GPU."""

    fmt: ExMy
    shape: tuple
    group_size: int           # G (= K for one scale per row)
    scale_dtype: str
    payload: object           # cupy uint8 [N, row_bytes], rows ROW_ALIGN-aligned (strides[0]: the kernels' stride)
    scales: object            # cupy uint16 [N, ngroups] raw scale bits
    order: str = "row"        # the payload's byte order: "row" (the file's, SPEC 3) or "tile" (tile_order)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def k(self) -> int:
        return int(self.shape[-1])

    @property
    def n(self) -> int:
        return int(self.payload.shape[0])

    @property
    def ngroups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.payload.nbytes + self.scales.nbytes)

    @property
    def fp16_compute(self) -> bool:
        """fp16 tensor-core operands are exact only for E <= 4 and fp16 scales."""
        return self.fmt.e <= 4 and self.scale_dtype == "F16"

    def dequantize(self, out_dtype: str = "F16", out=None):
        out = dequantize(self.payload, self.scales, self.scale_dtype, self.fmt, self.k, self.group_size,
                         out_dtype, out, order=self.order)
        return out.reshape(*self.shape[:-1], self.k) if out.ndim == 2 else out

    def dequant_plan(self, out, out_dtype: str = "F16") -> "DequantPlan":
        """A prepared launch writing this weight, dequantized, into `out` [N, K]: a contiguous cupy array
        (launched on cupy's current stream at each call), or a contiguous torch CUDA tensor of the
        matching dtype (bf16 included; launched on torch's current stream of its device when the plan
        is made, as gemv_plan does)."""
        stream = None
        if _is_torch(out):
            if not out.is_contiguous():
                raise ExmyError("out must be a contiguous tensor")
            stream, out = _stream_of(out), _torch_as_cupy(out)
        return DequantPlan(self.payload, self.scales, self.scale_dtype, self.fmt, self.k, self.n,
                           self.group_size, self.ngroups, out_dtype, out, stream, self.order)

    def kernel_scales(self, mode: int):
        """Scales in the form the GEMV kernel of `mode` multiplies by (computed once, on CuPy's current
        stream, which is waited for: the GEMV may be launched on another stream (torch's), and with
        programmatic dependent launch it loads its scales before it waits for the kernel before it)."""
        if mode not in self._cache:
            cupy = _cupy()
            if self.scale_dtype == "F16":
                f32 = self.scales.view(cupy.float16).astype(cupy.float32)
            else:
                f32 = (self.scales.astype(cupy.uint32) << 16).view(cupy.float32)
            if mode == 0:    # fp16(scale * 2^(15-bias)): exact, finite (checked by _mode)
                ks = (f32 * np.float32(2.0 ** (15 - self.fmt.bias))).astype(cupy.float16).view(cupy.uint16)
            elif mode == 1:  # fp16 scale as is
                ks = self.scales
            else:            # float32 scale
                ks = f32
            self._cache[mode] = cupy.ascontiguousarray(ks)
            cupy.cuda.get_current_stream().synchronize()
        return self._cache[mode]

    def rows(self, start: int, stop: int) -> "GpuWeight":
        """Rows start .. stop-1 over the same device memory. Its kernel mode is this whole weight's
        (fold_ok of all its scales), so one launch prepared for the view serves every slice of that
        shape (the experts of a stacked MoE projection, through GemvLaunch.move_weight)."""
        if self.order == "tile" and (start % 16 or stop % 16):
            raise ExmyError(f"rows {start}..{stop} of a weight in tile order: whole 16-row tiles only")
        view = GpuWeight(self.fmt, (stop - start, self.k), self.group_size, self.scale_dtype,
                         self.payload[start:stop], self.scales[start:stop], self.order)
        view._cache["fold_ok"] = self.fold_ok()
        return view

    def fold_ok(self) -> bool:
        if "fold_ok" not in self._cache:
            cupy = _cupy()
            smax = float(self.scales.view(cupy.float16).astype(cupy.float32).max()) if self.scale_dtype == "F16" else math.inf
            self._cache["fold_ok"] = smax * 2.0 ** (15 - self.fmt.bias) <= FP16_MAX
        return self._cache["fold_ok"]


def upload(qtensor=None, *, payload=None, scales=None, scale_dtype=None, fmt=None, shape=None,
           group_size=None, order: str | None = None, payload_order: str = "row") -> GpuWeight:
    """Put a quantized weight on the GPU: upload(qtensor) or upload(payload=..., scales=..., ...).

    order: the payload's byte order on the GPU, "row" (the file's; a CUDA torch or cupy payload whose
    rows the kernels can read is then used in place, not copied) or "tile" (tile_order: a reordered
    copy); None: "tile" where tile_order_applies, else "row". payload_order: the order of the payload
    given; "tile" for a CUDA payload a module keeps in tile order itself (tile_permuted), viewed in place
    (order None or "tile")."""
    if qtensor is not None:
        payload, scales, scale_dtype = qtensor.payload, qtensor.scales, qtensor.scale_dtype
        fmt, shape, group_size = qtensor.fmt, qtensor.shape, qtensor.group_size
    fmt = _fmt(fmt)
    shape = tuple(int(s) for s in shape)
    k = shape[-1]
    pay = _payload_rows(payload, fmt, k)
    bits = scale_bits(scales, scale_dtype)
    pay, bits, _, rows, g, _ = _check_layout(pay, bits, fmt, k, group_size)
    for name in (order or "row", payload_order):
        order_defines(name)  # (checks the names)
    if payload_order == "tile":
        if order == "row" or not _tileable(fmt, rows, k) or pay.strides[0] != pay.shape[1]:
            raise ExmyError(f"a payload in tile order is viewed in tile order, {fmt.name} with N a multiple of 16, K "
                            f"padded to a multiple of 128 and contiguous rows (not {rows}x{k}, order {order})")
        return GpuWeight(fmt, shape, g, scale_dtype, pay, bits, "tile")
    weight = GpuWeight(fmt, shape, g, scale_dtype, pay, bits)
    if order is None:
        order = "tile" if tile_order_applies(fmt, rows, k) else "row"
    return tile_order(weight) if order == "tile" else weight


def tile_order(weight: GpuWeight) -> GpuWeight:
    """A copy of a weight in row order with its payload in tile order (kernels/exmy_decode.cuh EXMY_TILE:
    each 16-row tile's bytes together, in blocks of 128 elements, plane by plane); the kernels read
    it with their tile-order builds (GemvKernel.order, DequantPlan)."""
    fmt, k, n = weight.fmt, weight.k, weight.n
    if weight.order != "row" or not _tileable(fmt, n, k):
        raise ExmyError(f"tile order takes a weight in row order of an unshared format with N a multiple of 16 "
                        f"and K padded to a multiple of 128 (not {fmt.name} {n}x{k} in {weight.order} order)")
    tiled = tile_permuted(weight.payload, fmt, k, _cupy())
    return GpuWeight(fmt, weight.shape, weight.group_size, weight.scale_dtype, tiled, weight.scales, "tile")


def tile_permuted(rows, fmt: ExMy, k: int, xp=np):
    """Payload rows [n, row_bytes] in row order (numpy; cupy with xp=cupy; torch with xp=torch; any row
    stride) -> a new contiguous [n, row_bytes] array of the same bytes in tile order (docs/kernels.md;
    n a multiple of 16, padded K of 128, an unshared format). row_permuted undoes it."""
    n, kp = rows.shape[0], padded_k(k)
    parts, offset = [], 0  # (rows of Kp * bits / 8 bytes, a multiple of 16: no padding)
    for w in fmt.planes:  # plane w: per row kp*w/8 bytes = kp/128 blocks of 16*w bytes
        plane = rows[:, offset:offset + kp * w // 8].reshape(n // 16, 16, kp // 128, 16 * w)
        parts.append(plane.swapaxes(1, 2).reshape(n // 16, kp // 128, 256 * w))
        offset += kp * w // 8
    return xp.concatenate(parts, axis=2).reshape(n, row_bytes(fmt, k))


def row_permuted(tiled, fmt: ExMy, k: int, xp=np):
    """The inverse of tile_permuted: payload rows [n, row_bytes] in tile order (contiguous) -> a new
    contiguous array of the same bytes in row order (the file's, SPEC section 3)."""
    n, kp = tiled.shape[0], padded_k(k)
    blocks = tiled.reshape(n // 16, kp // 128, row_bytes(fmt, k) * 16 // (kp // 128))
    parts, offset = [], 0
    for w in fmt.planes:  # plane w: 256*w bytes per block, 16 rows of 16*w
        plane = blocks[:, :, offset:offset + 256 * w].reshape(n // 16, kp // 128, 16, 16 * w)
        parts.append(plane.swapaxes(1, 2).reshape(n, kp * w // 8))
        offset += 256 * w
    return xp.concatenate(parts, axis=1)


def tile_order_applies(fmt: ExMy, n: int, k: int, routed: bool = False) -> bool:
    """Whether upload puts a weight [n, k] of `fmt` in tile order: unshared formats, whole 16-row tiles
    and 128-element blocks (Kp a multiple of 128; the rows then need no padding to ROW_ALIGN), except
    codes held in the 4-bit plane alone where batch 1 runs b1r: K past b1's staging (XS_LIMIT) on narrow
    layers, or for routed pairs (`routed`: the rows are experts whose batch-1 GEMVs are routed pairs; wide
    layers take nt1w instead, _gemv_kind). In tile order every warp iteration reads contiguous blocks: on
    an H200 and an H100, batch 2..16 1-20 % faster on every Llama shape and format timed, batch 1 level
    to 7 % faster but for e2m1's b1r (4-13 % slower on both GPUs, hence the exception) and, on the H100
    only, 3-5 % slower on three b1r / bf16 cases (docs/benchmarks.md, nineteenth session). e2m1 28672->8192
    (nt1w at batch 1) in tile order: 1-4 % faster at batch 1..8, level at 16 (H100, twenty-fifth session)."""
    if not _tileable(fmt, n, k):
        return False
    return fmt.planes != (4,) or _xs_bytes(fmt, k) <= XS_LIMIT or (not routed and gemv_wide(n, fmt))


def _tileable(fmt: ExMy, n: int, k: int) -> bool:
    return fmt.share == 1 and n % 16 == 0 and padded_k(k) % 128 == 0


class _StreamHandle:
    """A raw CUDA stream handle under the CUDA stream protocol (``__cuda_stream__``: version 0, handle)."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.handle


def cupy_stream(handle: int):
    """CuPy's view of a CUDA stream it did not create (torch's, by its ``cuda_stream`` handle): through
    ``Stream.from_external`` and the CUDA stream protocol where CuPy has it (CuPy 14 deprecates
    ``ExternalStream``), else ``ExternalStream``."""
    cupy = _cupy()
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is None:
        return cupy.cuda.ExternalStream(handle)
    return from_external(_StreamHandle(handle))


def _stream_of(x):
    if _is_torch(x):
        from .launch import torch_stream

        return cupy_stream(torch_stream(x.device))
    return _cupy().cuda.get_current_stream()


XS_LIMIT = 32 * 1024  # largest x staging buffer (bytes) of the b1 kernels (K <= ~13 000); else b1r


def build_define(defines: tuple, name: str) -> int:
    """The value a kernel build sees for macro `name` among its defines ("NAME=V", or "NAME" alone: 1,
    as with -DNAME), 0 where it is not given: the one place the host reads the tuning defines whose
    builds need another launch shape (GEMV_CPT)."""
    value = 0
    for d in defines:
        key, _, v = d.partition("=")
        if key == name:
            value = int(v) if v else 1
    return value


def _gemv_shape(fmt: ExMy, kind: str, defines: tuple = ()) -> tuple[int, int]:
    """(chunks per lane and iteration, chunks per warp iteration) of a kernel kind (gemv.cu Cfg), and
    of a build with a GEMV_CPT define (tuning)."""
    cpt = build_define(defines, "GEMV_CPT")  # (gemv.cu: <= 0 is the tuned choice)
    if cpt <= 0:
        cpt = 2 if kind in ("b1", "b1r") and fmt.bits <= 6 else 1
    return cpt, 4 * cpt


def gemv_tile_rows(kind: str) -> int:
    """Weight rows per warp (gemv.cu Cfg::MT tiles of GEMV_ROWS): two tiles for nt2w and nt1w."""
    return 2 * GEMV_ROWS if kind in ("nt1w", "nt2w") else GEMV_ROWS


def gemv_wide(n: int, fmt: ExMy) -> bool:
    """Batch 2..16: the kernels with two 16-row tiles per warp (each x fragment shared by the tiles:
    half the L1 traffic of nt1 / nt2) when their warps still fill the GPU: at 8 K slices, >= 3/4 of
    two blocks per SM (gemv_split's wave), i.e. N >= 48 rows per SM (N >= 6336 on 132 SMs); and
    codes of <= 6 bits, the formats they were measured faster for (H200: the batch 9-16 kernels, and
    nt1w at batch 2-8, which loses on 4096-row layers and wins from 8192 rows, e3m2 8192->28672 batch 8
    69.0 -> 60.9 us; docs/benchmarks.md, sixteenth session)."""
    sms = sm_count(_cupy().cuda.Device().id)
    return fmt.bits <= 6 and -(-n // (2 * GEMV_ROWS)) * GEMV_WARPS >= 0.75 * sms * GEMV_WARPS * 2


def _gemv_grid(n: int, rows: int, split: int, pairs: int = 0) -> tuple:
    """A GEMV launch's grid: one block per block-unit (GEMV_WARPS / split tiles of `rows` rows), times the
    routed pairs."""
    return (-(-n // (rows * (GEMV_WARPS // split))),) + ((pairs,) if pairs else ())


def _xs_bytes(fmt: ExMy, k: int, defines: tuple = ()) -> int:
    """Shared memory of the batch-1 kernels: x for every chunk of the padded iterations, 80 B each."""
    _, kstep = _gemv_shape(fmt, "b1", defines)
    nq = -(-k // 32)
    return -(-nq // kstep) * kstep * 80


GEMV_KINDS = ("b1", "nt1", "nt2", "b1r", "nt2w", "nt1w")  # kernels/gemv.cu KIND 0 .. 5
MODE4_KINDS = ("b1", "b1r")  # the kinds that take bf16 x as scaled fp16 themselves (mode 4; the others: mode 5)
X_COPY, X_BF16, X_SCALED = 0, 1, 2  # exmy_x_tiles' conversions of x (kernels/gemv.cu; x_tiles_conv)
# Mode 5 costs a fixed 1.5-2 us (a second kernel, and the GEMV waits for it) and saves decode work in
# proportion to the weights: layers of at least this many weights take it, per batch > 8 (measured on
# an H100, e2m2, with programmatic dependent launch: 4096->28672 and 8192->28672 12-19 % faster at
# every batch 2..16, 14336->4096 12-14 % faster at batch 16 and up to 16 % slower at batch 8,
# 4096->4096 up to 20 % slower; docs/benchmarks.md, 2026-12-05 sixth session). Since mode 5 writes
# x tiles, batch 9..16 takes it from 2^24 (H100, e2m2: 4096->4096 12.1 -> 11.5 us at batch 16, 11.6
# -> 11.4 at 9; 4096->1024 8.5 -> 9.5, so not below; benchmarks.md, fourteenth session)
X16_MIN_WEIGHTS = {False: 1 << 26, True: 1 << 24}


def takes_x16(kind: str, weights: int, batch: int) -> bool:
    """Whether bf16 x (E <= 4, one scale per row) is taken as scaled fp16 (x16_mode) rather than in mode 3:
    by the batch-1 kinds, by nt1w (two row tiles per warp; mode 5 was 10-16 % faster than mode 3 at every
    batch 2..8 on the layers that take it, level or slower on those that take nt1; H100, docs/benchmarks.md,
    sixth session), else from X16_MIN_WEIGHTS weights."""
    return kind in MODE4_KINDS + ("nt1w",) or weights >= X16_MIN_WEIGHTS[batch > 8]


def x16_mode(kind: str) -> int:
    """How a kernel of `kind` takes bf16 x as scaled fp16 (gemv_kernel): 4, converting it itself (the
    batch-1 kinds, which stage x per block anyway), or 5, given it converted by exmy_x_tiles."""
    return 4 if kind in MODE4_KINDS else 5


def x_tile_rows(batch: int) -> int:
    """Rows of x in its tiles: the batch padded to the mma column tiles of its kernels, 8 or 16."""
    return 8 if batch <= 8 else 16


def x_tiles_bytes(batch: int, k: int) -> int:
    """Device memory a launch with x tiles needs (the caller's workspace, 16-byte aligned): 2 KB per 128
    elements of K and 8 batch rows (x_tile_rows; K padded to 128: kernels/gemv.cu x_tile_word), then
    (x_tile_factors) a float per padded row (mode 5's 2^-s)."""
    rows = x_tile_rows(batch)
    return -(-k // 128) * rows * 256 + 4 * rows


@dataclass(frozen=True)
class GemvKernel:
    """One instantiation of the exmy_gemv template of kernels/gemv.cu: the kernel the host chose."""

    kind: str     # "b1" batch 1, x staged per block; "b1r" batch 1, larger K; "nt1" batch <= 8; "nt2" 9..16
    mode: int     # 0 fp16 operands, scale folded; 1 fp16 operands, two steps; 2 bf16 operands;
                  # 3 bf16 operands, one scale per row applied to the sums; 4 bf16 x used as
                  # fp16 times a power of two (MODE4_KINDS, one scale per row: gemv_kernel); 5 the same
                  # with x converted before the launch (exmy_x_tiles; the other kinds)
    x_dtype: str  # "F16" or "BF16": x and y
    groups: int   # 0 one scale per row, 1 groups aligned to 32-element chunks, 2 unaligned
    blocks: int   # blocks per SM its registers are sized for: 2 (<= 128 registers) or 3 (<= 80); tuning: 1 (<= 255)
    routed: bool = False  # exmy_gemv_routed: batch-1 GEMVs of routed (token, expert) pairs (RoutedGemvLaunch)
    tiled: bool = False   # x given as x tiles by exmy_x_tiles (gemv_tiled)
    order: str = "row"    # the weight payload's byte order (GpuWeight.order): "tile" builds with EXMY_TILE

    @property
    def expression(self) -> str:
        """The instantiation's C++ name, e.g. "exmy_gemv<3, 0, true, 0, 2, false>" (NVRTC name expression)."""
        xf16 = "true" if self.x_dtype == "F16" else "false"
        params = f"{GEMV_KINDS.index(self.kind)}, {self.mode}, {xf16}, {self.groups}, {self.blocks}"
        if self.routed:
            return f"exmy_gemv_routed<{params}>"
        return f"exmy_gemv<{params}, {'true' if self.tiled else 'false'}>"

    @property
    def name(self) -> str:
        """Name for logs and benchmark rows, e.g. exmy_gemv_fold_x16_b1r_g; a b1r built for 3
        blocks per SM ends in _3blocks (it depends on the launch; for the other kinds the blocks
        follow from the kernel and the format, gemv_blocks)."""
        mode = ("fold", "two", "bf", "bfrow", "bfx16", "bfx16p")[self.mode]
        x = "x16" if self.x_dtype == "F16" else "xbf"
        groups = ("", "_g", "_ga")[self.groups]
        three = "_3blocks" if self.kind == "b1r" and self.blocks == 3 else ""
        routed = "_routed" if self.routed else ""
        tiled = "_xt" if self.tiled and self.mode != 5 else ""  # (mode 5 always takes x tiles)
        order = "_to" if self.order == "tile" else ""
        return f"exmy_gemv_{mode}_{x}_{self.kind}{groups}{three}{routed}{tiled}{order}"


def staged_kind(weight: "GpuWeight") -> str:
    """The batch-1 kind: b1, x staged per block, where its buffer fits (XS_LIMIT), else b1r."""
    return "b1" if _xs_bytes(weight.fmt, weight.k) <= XS_LIMIT else "b1r"


def _gemv_kind(weight: "GpuWeight", batch: int, routed: bool = False) -> str:
    """The host's kind. Batch 1 takes nt1w instead of b1r on wide layers (gemv_wide) of unshared formats:
    two row tiles per warp keep more weight bytes in flight, and b1r's x window costs more than x read per
    chunk there. 28672->8192 at batch 1, H100 (twenty-fourth session): e2m2 55.6 -> 52.6 us, e3m2 62.4 ->
    61.5, e2m2 bf16 60.5 -> 56.5; on an H200 (nineteenth session) nt1w at batch 2 beat b1r at batch 1 in
    every format: e2m2 47.0 -> 46.2, e3m2 53.3 -> 47.0, e2m3 56.1 -> 51.4, e2m1 38.2 -> 35.5, bf16 53.3 ->
    48.3. Not for e2m2s4 (batch 2 48.7 -> 51.9 on the H100), not for routed pairs (their kernel is b1 /
    b1r), and not yet where b1 runs: 8192->28672 lost 3 % on the H100 (53.9 -> 55.5) and gained 6 % on the
    H200 (51.6 -> 48.5, at batch 2): docs/benchmarks.md."""
    if batch == 1:
        kind = staged_kind(weight)
        wide = kind == "b1r" and not routed and weight.fmt.share == 1 and gemv_wide(weight.n, weight.fmt)
        return "nt1w" if wide else kind
    if batch <= 8:
        return "nt1w" if gemv_wide(weight.n, weight.fmt) else "nt1"
    return "nt2w" if gemv_wide(weight.n, weight.fmt) else "nt2"


def gemv_blocks(fmt: ExMy, kind: str, mode: int, groups: int) -> int:
    """Blocks per SM the registers of a kernel are sized for (gemv.cu __launch_bounds__): 3 (<= 80
    registers) for b1 and nt1 with one scale per row applied to the sums (modes 0, 1, 3: fp16
    operands, or bf16 operands holding the codes' values) and codes of <= 5 bits, whose loops fit
    there without spills; 2 (<= 128) for the others (b1r: GemvPlan may take 3 for its launch,
    gemv_b1r_blocks)."""
    return 3 if kind in ("b1", "nt1") and mode != 2 and groups == 0 and fmt.bits <= 5 else 2


def gemv_tiled(kind: str, mode: int, weights: int) -> bool:
    """Whether a kernel takes x as x tiles (kernels/gemv.cu x_tile_word), written by exmy_x_tiles just
    before it in the operand type (x_tiles_conv): mode 5, which converts x in a kernel before the GEMV
    anyway, and the batch 9..16 kinds, with bf16 operands (modes 2, 3) on layers of X16_MIN_WEIGHTS[True]
    weights or more. From x's rows each 16-byte x load of a warp touches 16 cache lines, from the tiles
    4, and the pairs come in the mma's order (no PRMT; mode 2 with fp16 x: no conversion per load): at
    batch 9..16 with fp16 x 3-22 % faster on an H100 (e2m2 8192->28672 batch 16: 73.7 -> 68.2 us), with
    bf16 x and scale groups up to 21 % on an H200 (e2m2 g128 8192->28672: 161.1 -> 126.9 us); but the
    second kernel's fixed cost outweighed that on the small layers of bf16 operands (4096->1024 e2m2 g128:
    10.2 -> 12.5 us; in mode 3 with PDL 8.5 -> 9.1) and at batch 2..8, where x is half as much per
    weight (docs/benchmarks.md, fourteenth and sixteenth sessions)."""
    return mode == 5 or (kind in ("nt2", "nt2w") and (mode < 2 or weights >= X16_MIN_WEIGHTS[True]))


def gemv_kernel(weight: GpuWeight, x_dtype: str, batch: int, kind: str | None = None,
                tiled: bool | None = None, routed: bool = False) -> GemvKernel:
    """The kernel gemv uses for this weight, x dtype ("F16"/"BF16") and batch (<= 16): fp16
    operands where exact (E <= 4, F16 scales, fp16 x), with the scale folded into the weights where
    that stays finite in fp16; else bf16 operands: for bf16 x, E <= 4 and one scale per row, the
    scale is applied to the float32 sums (mode 3: the decode is one exact multiply), otherwise to
    each weight (mode 2). Instead of mode 3, x is taken as fp16 times a power of two per row, so that
    the weights take the fp16 decode with mode 3's bits (x16_mode): b1 and b1r convert x themselves
    (mode 4: never slower than mode 3, up to 18 % faster, on an H100), the batch 2..16 kinds take it
    converted once per launch by exmy_x_tiles (mode 5: a pass over x in each of their blocks cost
    more than it saved) where takes_x16 says. kind (tests and benchmarks):
    "nt1" or "nt1w" for batch 1..8 (batch 1: x read per chunk rather than staged), "nt2" or "nt2w" for
    batch 9..16, and at batch 1 also b1 where x fits its staging, else b1r; tiled (tests and benchmarks): the
    batch 9..16 kinds with x tiles (True) or x from its rows (False) where gemv_tiled would take the other
    (not in mode 5). routed: the kind of a routed pair's GEMV (b1 / b1r, at batch 1)."""
    if kind is None:
        kind = _gemv_kind(weight, batch, routed)
    elif kind not in (("nt1", "nt1w") if batch <= 8 else ("nt2", "nt2w")) + (
            (staged_kind(weight),) if batch == 1 else ()):
        raise ExmyError(f"kind {kind!r}: only nt1 or nt1w (batch 1..8), nt2 or nt2w (batch 9..16), and at batch 1 "
                        "b1 where x fits its staging, else b1r, can be chosen")
    groups = 0 if weight.ngroups == 1 else 2 if _gshift(weight) < 0 else 1
    if x_dtype == "F16" and weight.fp16_compute:
        mode = 0 if weight.fold_ok() else 1
    else:  # mode 3 where the GPU test proved it exact (bf16 x, E <= 4; fp16 x failed for 8-bit codes)
        mode = 3 if groups == 0 and x_dtype == "BF16" and weight.fmt.e <= 4 else 2
        if mode == 3 and takes_x16(kind, weight.n * weight.k, batch):
            mode = x16_mode(kind)
    use_tiles = gemv_tiled(kind, mode, weight.n * weight.k)
    if tiled is not None and tiled != use_tiles:
        if mode == 5 or kind not in ("nt2", "nt2w"):
            raise ExmyError(f"{kind} in mode {mode}: x tiles are for the batch 9..16 kinds, and mode 5 always "
                             "takes them")
        use_tiles = tiled
    return GemvKernel(kind, mode, x_dtype, groups, gemv_blocks(weight.fmt, kind, mode, groups), tiled=use_tiles,
                      order=weight.order)


def gemv_function(kernel: GemvKernel, fmt: ExMy, defines: tuple = ()):
    """The compiled `kernel` for `fmt` (a cupy RawKernel); each NVRTC compilation builds one kernel."""
    return _module("gemv.cu", fmt.e, fmt.m, tuple(defines) + order_defines(kernel.order), fmt.share,
                   kernel.expression).get_function(kernel.expression)


def x_tiles_conv(kernel: GemvKernel) -> int:
    """How exmy_x_tiles writes x for a tiled `kernel`: bf16 x as fp16 times 2^s per row in mode 5
    (X_SCALED); fp16 x rounded to bf16 for bf16 operands, mode 2 (X_BF16); else as it is (X_COPY)."""
    if kernel.mode == 5:
        return X_SCALED
    return X_BF16 if kernel.mode == 2 and kernel.x_dtype == "F16" else X_COPY


def x_tiles_threads(conv: int) -> int:
    """exmy_x_tiles' block size (a template parameter): 128 threads, a 32-element chunk each; X_SCALED 512,
    since each of its blocks first reads the whole row (up to 1024 chunks held in registers)."""
    return 512 if conv == X_SCALED else 128


def x_tiles_grid(batch: int, k: int, conv: int) -> tuple:
    """exmy_x_tiles' grid: per row of the padded batch (x_tile_rows), blocks that share the row's chunks
    (gridDim.y): a chunk per thread, or for X_SCALED 4 (each finds the row's largest |x| alone). One block
    per row left the GEMV waiting on 16 SMs: at batch 16 with fp16 x, the x tiles cost 2.7-3.2 us of an
    H100 call on 28672->8192 and 1.4-1.6 us spread (e2m2 57.3 -> 56.0 us, e3m2 68.5 -> 66.9), 1.9 -> 1.1 us
    on 14336->4096; mode 5 gained 0.3-0.8 us from K = 14336 (docs/benchmarks.md, twenty-fourth session)."""
    slices = 4 if conv == X_SCALED else -(-(-(-k // 128) * 4) // x_tiles_threads(conv))
    return (x_tile_rows(batch), slices)


def x_tiles_function(fmt: ExMy, conv: int):
    """exmy_x_tiles, x tiles for a GEMV with kernel.tiled (built with the GEMV's format, which sets the
    pair order), converting x as `conv` (x_tiles_conv) says."""
    name = f"exmy_x_tiles<{x_tiles_threads(conv)}, {conv}>"
    return _module("gemv.cu", fmt.e, fmt.m, (), fmt.share, name).get_function(name)


def gemv_split(n: int, k: int, fmt: ExMy, kind: str, rows: int = GEMV_ROWS, mode: int = 0) -> int:
    """K slices per 16-row tile (1, 2, 4 or 8) for a kernel of `kind` in `mode` (choices measured on an
    H100: docs/benchmarks.md, H100 tuning): 8 for layers of >= 1024 tiles (the 8 warps of a block then read
    neighbouring bytes of the same rows), but 4 for b1 in mode 4 (each block stages all of x, which mode 4
    also converts in place after a barrier: with two tiles per block that costs half as much per weight
    byte; 4096->28672 and 8192->28672 e2m2 13 % and 4 % faster than with 8); otherwise the fewest slices that give about one wave of
    warps at two blocks per SM, doubled for b1r kernels of unshared formats with a 1-bit plane
    (e2m2, e3m1: their longer decode favours more, shorter slices); always >= 2 iterations per
    slice."""
    tiles = -(-n // rows)  # warp tiles
    target = sm_count(_cupy().cuda.Device().id) * GEMV_WARPS * 2
    split = 1
    # nt1w: counted in 16-row tiles, as nt1 (8 slices on 28672-row layers: 56 against 60-65 us at
    # batch 8, e2m2 and bf16 x; H200, docs/benchmarks.md)
    if tiles >= 1024 or (kind == "nt1w" and n >= 1024 * GEMV_ROWS):
        split = GEMV_WARPS // 2 if kind == "b1" and mode == 4 else GEMV_WARPS
    while split < GEMV_WARPS and tiles * split < 0.75 * target:
        split *= 2
    if kind == "b1r" and fmt.share == 1 and fmt.bits % 2 == 1:
        split = min(2 * split, GEMV_WARPS)
    _, kstep = _gemv_shape(fmt, kind)
    niter = -(-k // (32 * kstep))
    while split > 1 and niter < 2 * split:
        split //= 2
    return split


def gemv_b1r_blocks(kernel: GemvKernel, grid: int, fmt: ExMy, sms: int) -> int:
    """Blocks per SM to build the b1r `kernel` for when launched with `grid` blocks: 3, the
    80-register build without the second register set, where that leaves the last wave of blocks
    fuller than 2 does (e.g. 5120-row layers: 320 blocks are 1.2 waves at 2 per SM, 0.8 at 3);
    otherwise 2. Only for fp16 operands with one scale per row and codes of other than 6 bits: bf16
    operands and scale groups gained little or lost for some formats on an H100, and 6-bit codes
    spill at 80 registers (docs/benchmarks.md, H100 tuning)."""
    if kernel.kind != "b1r" or kernel.mode >= 2 or kernel.groups != 0 or fmt.bits == 6:
        return 2

    def fill(per_sm: int) -> float:  # share of the block slots of the waves the launch needs
        slots = sms * per_sm
        return grid / (-(-grid // slots) * slots)

    return 3 if fill(3) > fill(2) else 2


GEMV_INTERLEAVE = 1  # K slices of a tile take alternate iterations (1) or contiguous runs (0)


def _gshift(weight: GpuWeight) -> int:
    """Group index = chunk >> gshift (31: one group per row); -1: groups not aligned to 32 (slow path)."""
    if weight.ngroups == 1:
        return 31
    g = weight.group_size
    if g % 32 == 0 and (g // 32) & (g // 32 - 1) == 0:
        return (g // 32).bit_length() - 1
    return -1


def _x_as_u16(x, x_dtype):
    """(cupy uint16 [B, K] view of x, x dtype name, was torch, was 1-D)."""
    cupy = _cupy()
    torch_in = _is_torch(x)
    if torch_in:
        import torch

        if x.dtype not in (torch.float16, torch.bfloat16):
            raise ExmyError(f"x must be float16 or bfloat16, not {x.dtype}")
        x_dtype = "F16" if x.dtype == torch.float16 else "BF16"
        xc = _torch_as_cupy(x)
    else:
        xc = cupy.ascontiguousarray(cupy.asarray(x))
        if x_dtype is None:
            if xc.dtype != cupy.float16:
                raise ExmyError("cupy x must be float16, or uint16 bf16 bits with x_dtype='BF16'")
            x_dtype = "F16"
    if x_dtype not in ("F16", "BF16"):
        raise ExmyError(f"x_dtype must be F16 or BF16, not {x_dtype!r}")
    squeeze = xc.ndim == 1
    xc = xc.reshape(1, -1) if squeeze else xc
    xc = xc.view(cupy.uint16)
    if xc.data.ptr % 16:
        xc = xc.copy()
    return xc, x_dtype, torch_in, squeeze


@dataclass(frozen=True)
class _GemvLaunchShape:
    """What the host decides for one weight, x dtype and batch: kernel, its function, grid, shared
    memory and the K split (the arguments other than x and y follow from the weight)."""

    kernel: GemvKernel
    fn: object      # cupy RawKernel
    grid: tuple
    smem: int
    split: int
    interleave: int
    tiles: tuple | None = None  # kernel.tiled: exmy_x_tiles (cupy RawKernel), its grid and block, launched first

    def args(self, weight: "GpuWeight", x, y, batch: int, scales=None) -> tuple:
        """exmy_gemv's arguments (scales: the kernel scales, default the weight's own)."""
        scales = weight.kernel_scales(self.kernel.mode) if scales is None else scales
        return (weight.payload, scales, x, y, np.uint32(weight.n),
                np.uint32(weight.k), np.uint32(weight.payload.strides[0]), np.uint32(weight.ngroups),
                np.uint32(weight.group_size), np.int32(_gshift(weight)), np.uint32(batch),
                np.uint32(self.split), np.uint32(self.interleave))


def _gemv_launch_shape(weight: "GpuWeight", x_dtype: str, batch: int, split: int | None = None,
                       interleave: int | None = None, defines: tuple = (), blocks: int | None = None,
                       kind: str | None = None, pairs: int = 0, mode: int | None = None,
                       tiled: bool | None = None):
    """pairs > 0: the routed kernel for that many (token, expert) pairs of batch 1, one grid row each;
    its kernel and split are the single GEMV's, so that each pair's row is the same computation bit for bit."""
    if not 1 <= batch <= MAX_BATCH:
        raise ExmyError(f"a GEMV launch takes 1..{MAX_BATCH} rows of x, not {batch}")
    if not supports(weight.fmt):
        raise ExmyError(f"the fused GEMV does not handle {weight.fmt.name} yet (gpu.supports)")
    if pairs and (batch != 1 or kind is not None or not 1 <= pairs <= MAX_PAIRS):
        raise ExmyError(f"a routed GEMV takes 1..{MAX_PAIRS} pairs of one row each, not {pairs} of {batch}")
    kernel = gemv_kernel(weight, x_dtype, batch, kind, tiled, routed=bool(pairs))
    if mode is not None and mode != kernel.mode:
        pair = (3, x16_mode(kernel.kind))
        if not (mode in pair and kernel.mode in pair and not pairs):
            raise ExmyError(f"mode {mode}: only launches of bf16 x with E <= 4 and one scale per row switch "
                            f"between mode 3 and mode {pair[1]}; this one is {kernel.name}")
        kernel = replace(kernel, mode=mode, tiled=gemv_tiled(kernel.kind, mode, weight.n * weight.k))
    if pairs:
        kernel = replace(kernel, routed=True)
    rows = gemv_tile_rows(kernel.kind)
    split = split or gemv_split(weight.n, weight.k, weight.fmt, kernel.kind, rows, kernel.mode)
    interleave = GEMV_INTERLEAVE if interleave is None else int(interleave)
    grid = _gemv_grid(weight.n, rows, split, pairs)
    if kernel.kind == "b1r":  # (routed: the 128-register build; at 80 the per-pair addresses spill)
        sms = sm_count(_cupy().cuda.Device().id)
        blocks = blocks or (2 if pairs else gemv_b1r_blocks(kernel, grid[0], weight.fmt, sms))
    if blocks:
        kernel = replace(kernel, blocks=int(blocks))
    if kernel.kind == "b1r":
        # each warp's x window (one iteration's chunks, 80 bytes each) x 2
        smem = GEMV_WARPS * _gemv_shape(weight.fmt, "b1r")[1] * 80 * 2
    else:
        smem = _xs_bytes(weight.fmt, weight.k, defines) if kernel.kind == "b1" else 0
    fn = gemv_function(kernel, weight.fmt, defines)
    # beyond 48 KB of static + dynamic shared memory a launch needs the function's opt-in attribute
    if smem + fn.shared_size_bytes > 48 * 1024 and fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    tiles = None
    if kernel.tiled:
        conv = x_tiles_conv(kernel)
        tiles = (x_tiles_function(weight.fmt, conv), x_tiles_grid(batch, weight.k, conv), (x_tiles_threads(conv),))
    return _GemvLaunchShape(kernel, fn, grid, smem, split, interleave, tiles)


class GemvPlan:
    """One fused GEMV launch (batch <= 16) with its arguments prepared; call it to launch."""

    def __init__(self, xc, x_dtype: str, weight: GpuWeight, y, stream, split: int | None = None,
                 interleave: int | None = None, defines: tuple = (), overlap: bool = False,
                 blocks: int | None = None, kind: str | None = None, mode: int | None = None,
                 tiled: bool | None = None):
        batch = int(xc.shape[0])
        if xc.shape[1] != weight.k:
            raise ExmyError(f"x has {xc.shape[1]} columns; the weight needs {weight.k}")
        shape = _gemv_launch_shape(weight, x_dtype, batch, split, interleave, defines, blocks, kind, mode=mode,
                                   tiled=tiled)
        self.kernel, self.fn, self.grid, self.smem = shape.kernel, shape.fn, shape.grid, shape.smem
        self.split, self.interleave = shape.split, shape.interleave
        self.tiles = None  # kernel.tiled: (exmy_x_tiles, its grid, block and arguments), launched first
        if shape.tiles is not None:
            work = _cupy().empty(x_tiles_bytes(batch, weight.k), dtype=np.uint8)
            self.tiles = shape.tiles + ((xc, work, np.uint32(weight.k), np.uint32(batch)),)
            xc = work
        self.args = shape.args(weight, xc, y, batch)
        self.stream = stream
        # overlap: programmatic dependent launch (exmyconv.cuda.launch) for the call's first kernel: the
        # weight loads start while the kernel before is still running; x and y are touched only after it
        # has finished. After its x tiles the GEMV always takes it where the device has it, as the layers'
        # launches do (GemvLaunch): the tiles never write the weights, so a call is timed as a layer runs it.
        self._pdl = None
        if overlap or (self.tiles is not None and pdl_available()):
            from .launch import Launch

            self._pdl = [Launch(*self.tiles, pdl=overlap)] if self.tiles else []
            self._pdl.append(Launch(self.fn, self.grid, (GEMV_WARPS * 32,), self.args, self.smem,
                                    pdl=overlap or self.tiles is not None))

    @property
    def name(self) -> str:
        return self.kernel.name

    def __call__(self):
        if self._pdl is not None:
            for launch in self._pdl:
                launch(self.stream.ptr)
            return
        with self.stream:
            if self.tiles is not None:
                fn, grid, block, args = self.tiles
                fn(grid, block, args)
            self.fn(self.grid, (GEMV_WARPS * 32,), self.args, shared_mem=self.smem)


class GemvLaunch:
    """The GEMV of one weight for one x dtype and batch, prepared once; a call passes only the
    addresses of x and y and the stream: no CuPy objects, no planning, no allocation. This is what a
    model layer calls per token (its Python cost is a few microseconds, like F.linear's dispatch).

    x: contiguous [batch, K] fp16/bf16 at a 16-byte aligned address; y: contiguous [batch, N] of
    x's dtype. ``work_bytes`` > 0 (x tiles: kernel.tiled): each call also needs that many bytes of device memory, 16-byte
    aligned, that nothing else uses until the launch has run (the caller allocates it, e.g. from torch's
    allocator: safe inside CUDA-graph capture and on any stream). With ``overlap`` (compute capability
    >= 9.0) the launch uses programmatic dependent launch (exmyconv.cuda.launch), which is also valid
    inside CUDA-graph capture."""

    PAYLOAD_ARG, SCALES_ARG, X_ARG, Y_ARG = 0, 1, 2, 3  # positions among the kernel's arguments

    def __init__(self, weight: GpuWeight, x_dtype: str, batch: int, overlap: bool = False):
        from .launch import Launch

        shape = _gemv_launch_shape(weight, x_dtype, batch)
        self.kernel = shape.kernel
        self._weight = weight  # keeps the payload and the kernel's scales alive
        self._launch = Launch(shape.fn, shape.grid, (GEMV_WARPS * 32,), shape.args(weight, 0, 0, batch),
                              shape.smem, pdl=overlap)
        self._tiles = None if shape.tiles is None else Launch(
            *shape.tiles, (0, 0, np.uint32(weight.k), np.uint32(batch)), pdl=overlap)
        self.work_bytes = 0 if shape.tiles is None else x_tiles_bytes(batch, weight.k)

    def move_weight(self, payload_ptr: int, scales_ptr: int) -> None:
        """Point the launch at another weight of the same shape, format and kernel (e.g. another
        expert of a stacked MoE projection): the address of its payload and of its kernel scales
        (``GpuWeight.kernel_scales(self.kernel.mode)``'s layout). The caller keeps both alive."""
        self._launch.set_pointer(self.PAYLOAD_ARG, payload_ptr)
        self._launch.set_pointer(self.SCALES_ARG, scales_ptr)

    def __call__(self, x_ptr: int, y_ptr: int, stream_handle: int, work_ptr: int = 0) -> None:
        if x_ptr % 16 or work_ptr % 16:
            raise ExmyError("the GEMV reads x in 16-byte words: its address (and the workspace's) must be 16-byte aligned")
        if self._tiles is not None:
            if not work_ptr:
                raise ExmyError(f"this GEMV launch ({self.kernel.name}) needs a workspace of {self.work_bytes} bytes")
            self._tiles.set_pointer(0, x_ptr)
            self._tiles.set_pointer(1, work_ptr)
            self._tiles(stream_handle)
            x_ptr = work_ptr
        self._launch.set_pointer(self.X_ARG, x_ptr)
        self._launch.set_pointer(self.Y_ARG, y_ptr)
        self._launch(stream_handle)


MAX_PAIRS = 65535  # routed pairs per launch (the grid's y dimension)


class RoutedGemvLaunch:
    """The GEMVs of the routed (token, expert) pairs of a stacked MoE projection, one launch
    (kernels/gemv.cu exmy_gemv_routed), prepared once per number of pairs.

    ``stack``: the weights of ``experts`` experts as one [experts * N, K] weight (expert e's N rows
    from row e * N). Pair p multiplies x row p // x_div (x_div = top-k where the pairs of a token
    share its row; 1 where x has a row per pair) by expert ids[p]'s weight into y row p. The ids
    (int64, one per pair) are read on the GPU, never by the host, so a CUDA graph captures the launch
    once for every routing. Each row equals the batch-1 GemvLaunch of that expert's rows (same kernel
    mode: the whole stack's, GpuWeight.rows) bit for bit; an id outside 0..experts-1 gives zeros."""

    IDS_ARG = 13  # the arguments after exmy_gemv's: ids, experts, bytes per expert, scale bytes per expert, x_div

    def __init__(self, stack: GpuWeight, experts: int, x_dtype: str, pairs: int, x_div: int = 1,
                 overlap: bool = False):
        from .launch import Launch

        n = stack.n // experts
        if experts < 1 or n * experts != stack.n or x_div < 1:
            raise ExmyError(f"a routed GEMV needs {stack.n} rows split evenly over {experts} experts and x_div >= 1")
        first = stack.rows(0, n)  # the launch shape of one expert, with the whole stack's kernel mode
        shape = _gemv_launch_shape(first, x_dtype, 1, pairs=pairs)
        scales = stack.kernel_scales(shape.kernel.mode)
        self.kernel, self.pairs = shape.kernel, pairs
        self._keep = (stack, scales)
        args = shape.args(first, 0, 0, 1, scales) + (
            0, np.uint32(experts), np.uint64(n * stack.payload.strides[0]),
            np.uint64(n * stack.ngroups * scales.itemsize), np.uint32(x_div))
        self._launch = Launch(shape.fn, shape.grid, (GEMV_WARPS * 32,), args, shape.smem, pdl=overlap)

    def __call__(self, ids_ptr: int, x_ptr: int, y_ptr: int, stream_handle: int) -> None:
        """ids: int64 [pairs]; x: contiguous rows of K at a 16-byte aligned address; y: [pairs, N]."""
        if x_ptr % 16 or ids_ptr % 8:
            raise ExmyError("the routed GEMV reads x in 16-byte words and the ids as int64: align them")
        self._launch.set_pointer(self.IDS_ARG, ids_ptr)
        self._launch.set_pointer(GemvLaunch.X_ARG, x_ptr)
        self._launch.set_pointer(GemvLaunch.Y_ARG, y_ptr)
        self._launch(stream_handle)


def gemv_plan(x, weight: GpuWeight, out, x_dtype: str | None = None, **tuning) -> GemvPlan:
    """Prepare y = x @ W.T into `out` ([B, N], B <= 16, same dtype as x) for repeated launches.

    tuning (benchmarks and tests): split=1|2|4|8, interleave=0|1, blocks=1|2|3 (blocks per SM the
    build's registers are sized for, instead of gemv_blocks / gemv_b1r_blocks),
    defines=("GEMV_CPT=4", ...; b1 sizes its staged x by GEMV_CPT), kind="nt1"|"nt1w"
    (batch 1..8) or "nt2"|"nt2w" (batch 9..16), instead of the host's choice (gemv_kernel),
    mode=3|4|5 (bf16 x and one scale per row: mode 3 instead of the host's mode 4 (b1, b1r) or 5, or back),
    tiled=True|False (batch 9..16: x tiles or x from its rows, against the host's gemv_tiled; not in mode 5).
    overlap=True launches with programmatic dependent launch (exmyconv.cuda.launch): only where the
    weights are not written by the kernel just before (always so for model weights)."""
    cupy = _cupy()
    xc, x_dtype, _, _ = _x_as_u16(x, x_dtype)
    y = _torch_as_cupy(out) if _is_torch(out) else cupy.asarray(out)
    y = y.view(cupy.uint16)
    if tuple(y.shape) != (xc.shape[0], weight.n) or not y.flags.c_contiguous:
        raise ExmyError(f"out must be a contiguous [{xc.shape[0]}, {weight.n}] array")
    return GemvPlan(xc, x_dtype, weight, y, _stream_of(x), **tuning)


def gemv(x, weight: GpuWeight, out=None, x_dtype: str | None = None):
    """y = x @ W.T with W dequantized on the fly (each packed weight read once per 16 rows of x).

    x: [B, K] (or [K]) fp16/bf16, a CUDA torch tensor or a cupy array (float16, or uint16 bf16
    bits with x_dtype="BF16"). Returns y [B, N] of x's kind and dtype (torch in, torch out; bf16
    cupy results are uint16 bits). Accumulation is float32 on tensor cores (docs/kernels.md).
    """
    cupy = _cupy()
    xc, x_dtype, torch_in, squeeze = _x_as_u16(x, x_dtype)
    if xc.ndim != 2 or xc.shape[1] != weight.k:
        raise ExmyError(f"x has shape {tuple(xc.shape)}; the weight needs [B, {weight.k}]")
    batch, n = int(xc.shape[0]), weight.n
    if out is None:
        y = cupy.empty((batch, n), dtype=cupy.uint16)
    else:
        y = (_torch_as_cupy(out) if _is_torch(out) else cupy.asarray(out)).view(cupy.uint16)
        if tuple(y.shape) != (batch, n) or not y.flags.c_contiguous:
            raise ExmyError(f"out must be a contiguous array of shape {(batch, n)}")
    stream = _stream_of(x)
    for b0 in range(0, batch, MAX_BATCH):
        b = min(MAX_BATCH, batch - b0)
        GemvPlan(xc[b0:b0 + b], x_dtype, weight, y[b0:b0 + b], stream)()
    if out is not None:
        return out
    if torch_in:
        import torch

        t = torch.as_tensor(y.view(cupy.int16), device=x.device)
        t = t.view(torch.float16 if x_dtype == "F16" else torch.bfloat16)
        return t[0] if squeeze else t
    y = y.view(cupy.float16) if x_dtype == "F16" else y
    return y[0] if squeeze else y
