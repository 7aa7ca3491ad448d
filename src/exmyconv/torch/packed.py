"""PackedLinear: ``y = x W^T + b`` for a packed ExMy weight whose tensors an engine owns.

An inference engine (the vLLM plugin, :mod:`exmyconv.integrations.vllm_impl`) keeps a checkpoint's
``T_packed`` (uint8 [N, row_bytes]) and ``T_scale`` ([N, ngroups]) as its own parameters and, per call,
runs one torch op::

    torch.ops.exmyconv.packed_linear(x, packed, scale, bias, handle)

``handle`` names a :class:`PackedLinear`: the record's parameters (format, K, G) and, on CUDA, what the
calls reuse. The op is opaque to ``torch.compile`` (a fake implementation gives the output's shape), so
a traced model keeps it as one node.

Compute:

- CPU (or any input the CUDA path does not take): the weight is decoded into ``x.dtype`` by the torch
  codec (:func:`exmyconv.torch.codec.dequantize`, bitwise what ``exmyconv dequantize`` writes) and
  ``F.linear`` runs.
- CUDA, fp16/bf16 ``x`` with at most ``gpu.MAX_BATCH`` (16) rows and a format the fused GEMV handles
  (``exmyconv.cuda.gpu.gemv_applies``, the rule ExmyLinear follows too): ``exmyconv.cuda.gpu``'s GEMV,
  through a ``gpu.GemvLaunch`` prepared once per (rows, dtype), as ExmyLinear keeps them: a call
  passes the addresses of ``x`` and of an output torch allocates (and of a workspace where x goes
  through x tiles: ``linear.call_gemv``), and the stream (no planning, no CuPy objects; programmatic
  dependent launch on compute capability >= 9.0).
- CUDA, more rows: the weight is dequantized bit-exactly into one scratch buffer shared by every
  layer on that device and dtype (the largest layer's size; layers run one after another on a stream),
  by a plan prepared once, then ``F.linear`` (cuBLAS): the same result as the plain model.

What this module adds to :class:`exmyconv.torch.linear.ExmyLinear`'s CUDA path (whose GPU view of the
tensors, ``linear.gpu_view``, it shares; decoding is the torch codec's and the kernels' alone) is the
preparation for CUDA graphs. Every launch goes to torch's current stream. :meth:`PackedLinear.prepare`
builds everything a CUDA call needs (kernels compiled, scales derived, GEMV launches for 1..16 rows,
the scratch reserved) so that a call during CUDA-graph capture only looks them up: no allocation
outside torch, no host synchronisation.

:func:`slice_k` cuts a K range out of a packed weight (row-parallel tensor parallelism).
"""
from __future__ import annotations

import threading
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import cuda
from ..cuda.launch import torch_stream
from ..errors import ExmyError
from ..format.exmy import ExMy, get_format
from ..format.pack import pack_codes, row_bytes
from ..format.quant import groups_of
from .codec import SCALE_NAME, dequantize, unpack_codes
from ..cuda.gpu import row_permuted
from .linear import gpu_view, live_module, pdl_ok, register_handle, run_gemv, tile_ordered


class PackedLinear:
    """The parameters of one packed weight [N, K] and the caches of its CUDA calls.

    ``fmt``, ``k`` (K), ``group_size`` (G; None or >= K: one scale per row) and ``n`` (N, rows) describe
    the tensors passed to each call: ``packed`` uint8 [N, row_bytes(fmt, K)] and ``scale`` [N, ngroups]
    (float16 or bfloat16 as stored; float32 holds either exactly, but then the CUDA path decodes with the
    torch codec instead of the kernels). The object must stay alive while the op may be called with its
    handle (an engine keeps it on the layer). ``order``: the byte order of ``packed``, "row" (the file's)
    or, once the engine has taken :meth:`tile_ordered`'s tensor instead, "tile".
    """

    def __init__(self, fmt: ExMy | str, k: int, n: int, group_size: int | None = None):
        self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        self.k, self.n = int(k), int(n)
        self.group_size, self.ngroups = groups_of(self.k, group_size)
        self.row_bytes = row_bytes(self.fmt, self.k)
        self.handle = register_handle(self)
        self.order = "row"
        self._cuda: Optional[_CudaState] = None

    def __repr__(self):
        g = "" if self.group_size == self.k else f", group_size={self.group_size}"
        return f"PackedLinear({self.fmt.name}, k={self.k}, n={self.n}{g})"

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """y = x W^T + bias, through the op (what an engine calls; traceable by torch.compile)."""
        return torch.ops.exmyconv.packed_linear(x, packed, scale, bias, self.handle)

    def check(self, packed: torch.Tensor, scale: torch.Tensor) -> None:
        """Raise ExmyError unless ``packed`` and ``scale`` have this weight's layout."""
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (self.n, self.row_bytes):
            raise ExmyError(f"packed weight must be uint8 [{self.n}, {self.row_bytes}] for {self.fmt.name} "
                            f"with K={self.k}, got {packed.dtype} {list(packed.shape)}")
        if tuple(scale.shape) != (self.n, self.ngroups) or scale.dtype not in (torch.float16, torch.bfloat16,
                                                                               torch.float32):
            raise ExmyError(f"scales must be float16/bfloat16 [{self.n}, {self.ngroups}], "
                            f"got {scale.dtype} {list(scale.shape)}")

    def dequantize(self, packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight [N, K] decoded into ``dtype`` by the torch codec (a new tensor on packed's device)."""
        if self.order == "tile":
            packed = row_permuted(packed, self.fmt, self.k, torch)
        return dequantize(packed, scale, self.fmt, self.k, self.group_size, dtype)

    def tile_ordered(self, packed: torch.Tensor, gpu=None) -> torch.Tensor | None:
        """``packed`` (row order) as a new tensor in tile order, the order the GEMV reads fastest
        (:func:`exmyconv.torch.linear.tile_ordered`), where the GPU backend (``gpu``; default: this
        machine's, for a CUDA tensor) takes it; else None. From then on every call's ``packed`` is taken
        to be in tile order: the engine replaces its tensor by this one, once, after loading."""
        if gpu is None and packed.is_cuda:
            gpu = cuda.backend()
        tiled = tile_ordered(gpu, packed, self.fmt, self.k) if self.order == "row" else None
        if tiled is not None:
            self.order, self._cuda = "tile", None
        return tiled

    def in_row_order(self) -> None:
        """Calls pass ``packed`` in row order again (the engine writes the file's rows into it: a reload)."""
        self.order, self._cuda = "row", None

    def forward(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """The op's body (eager): the CUDA path where it applies, else decode + F.linear."""
        if x.is_cuda and packed.is_cuda:
            state = self._cuda_state(packed, scale)
            if state is not None:
                return state.forward(x, bias)
        return F.linear(x, self.dequantize(packed, scale, x.dtype), bias)

    # -- CUDA -------------------------------------------------------------------------------------
    def prepare(self, packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> bool:
        """Make every CUDA call for activations of ``dtype`` a lookup (see the module docstring).

        Call it before CUDA graphs are captured, for every layer, with the tensors later calls pass.
        Returns False (and does nothing) where the CUDA kernels do not apply: a CPU tensor, no GPU
        backend (CuPy) here, float32 scales."""
        state = self._cuda_state(packed, scale)
        if state is None:
            return False
        state.prepare(dtype)
        return True

    def _cuda_state(self, packed: torch.Tensor, scale: torch.Tensor) -> Optional["_CudaState"]:
        if not packed.is_cuda or scale.dtype not in SCALE_NAME:
            return None
        key = (packed.data_ptr(), scale.data_ptr(), scale.dtype)
        state = self._cuda
        if state is None or state.key != key:
            gpu = cuda.backend()
            if gpu is None:
                return None
            self.check(packed, scale)
            state = self._cuda = _CudaState(gpu, self, packed, scale, key)
        return state


class _CudaState:
    """One weight's GPU view (``gpu.upload``: zero-copy over the torch tensors) and its prepared launches."""

    def __init__(self, gpu, spec: PackedLinear, packed: torch.Tensor, scale: torch.Tensor, key):
        self.gpu, self.spec, self.key, self.device = gpu, spec, key, packed.device
        self.weight = gpu_view(gpu, packed, scale, spec.fmt, spec.k, spec.group_size, order=spec.order)
        self._keep = (packed, scale)  # the GPU view reads these tensors' memory
        self.launches: dict = {}  # (rows, dtype) -> gpu.GemvLaunch
        self.dequant: dict = {}  # (dtype, scratch address, stream) -> dequantization plan

    def prepare(self, dtype: torch.dtype) -> None:
        for rows in range(1, self.gpu.MAX_BATCH + 1):
            if self._gemv(rows, dtype):
                self._launch(rows, dtype)
        self._dequantized(dtype)

    def _gemv(self, rows: int, dtype: torch.dtype) -> bool:
        return dtype in SCALE_NAME and self.gpu.gemv_applies(self.spec.fmt, SCALE_NAME[dtype], rows)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // self.spec.k
        if x.shape[-1] == self.spec.k and self._gemv(rows, x.dtype):  # (else F.linear, or its shape error)
            y = run_gemv(self._launch(rows, x.dtype), x, self.spec.n)
            if bias is not None:
                y += bias
            return y
        return F.linear(x, self._dequantized(x.dtype), bias)

    def _launch(self, rows: int, dtype: torch.dtype):
        launch = self.launches.get((rows, dtype))
        if launch is None:
            launch = self.launches[(rows, dtype)] = self.gpu.GemvLaunch(self.weight, SCALE_NAME[dtype], rows,
                                                                        overlap=pdl_ok(self.device))
        return launch

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight dequantized into the shared scratch buffer, on torch's current stream."""
        n, k = self.spec.n, self.spec.k
        w = _scratch(self.device, dtype, n * k)[: n * k].view(n, k)
        stream = torch_stream(self.device)
        key = (dtype, w.data_ptr(), stream)
        plan = self.dequant.get(key)
        if plan is None:
            if len(self.dequant) > 8:  # the scratch grew or streams changed: old plans are dead
                self.dequant.clear()
            out_dtype = SCALE_NAME.get(dtype) or ("F32" if dtype == torch.float32 else None)
            if out_dtype is None:
                raise ExmyError(f"cannot dequantize to {dtype} on the GPU (float16, bfloat16 or float32)")
            plan = self.dequant[key] = self.weight.dequant_plan(w, out_dtype)  # on torch's current stream
        plan()
        return w


# ----------------------------------------------------------------------------- shared GPU resources

_SCRATCH: dict = {}  # (device index, dtype) -> 1-D tensor
_LOCK = threading.Lock()


def _scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The dequantization buffer of ``device`` and ``dtype``, at least ``numel`` elements.

    It only grows (by being replaced); growing while a CUDA graph is being captured is refused, since
    earlier graphs may still use the old buffer (prepare every layer before capturing)."""
    key = (device.index if device.index is not None else torch.cuda.current_device(), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        if torch.cuda.is_current_stream_capturing():
            raise ExmyError("exmyconv: a layer was not prepared before CUDA-graph capture "
                            "(PackedLinear.prepare for every layer first)")
        with _LOCK:
            buf = _SCRATCH.get(key)
            if buf is None or buf.numel() < numel:
                buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


# ----------------------------------------------------------------------------- the op

@torch.library.custom_op("exmyconv::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                  handle: int) -> torch.Tensor:
    """y = x W^T + bias for the packed weight (``packed``, ``scale``) described by PackedLinear ``handle``."""
    return live_module(handle, "packed_linear").forward(x, packed, scale, bias)


@packed_linear.register_fake
def _(x, packed, scale, bias, handle):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# ----------------------------------------------------------------------------- tensor parallelism

def slice_k(packed: torch.Tensor | None, scale: torch.Tensor | None, fmt: ExMy | str, k: int,
            group_size: int | None, start: int, length: int):
    """Columns ``start .. start+length`` of a packed weight [N, K] as a packed weight [N, length] of its own.

    For row-parallel layers, which split K across ranks: the codes are unpacked (torch codec),
    sliced and packed again (``format.pack``), each row padded anew (SPEC section 3); the scales keep
    the groups in the range (a per-row scale stays as is, G becomes ``length``). Returns (packed,
    scales, G); either input may be None (a loader gets them one at a time), and so is its output.
    The range must start on a scale-group boundary and end on one (or at K), and, for a shared
    format, start on a sharing group; else ExmyError.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    g, ngroups = groups_of(k, group_size)
    end = start + length
    if not (0 <= start < end <= k):
        raise ExmyError(f"columns {start}..{end} are not inside K={k}")
    if ngroups > 1 and (start % g or (end % g and end != k)):
        raise ExmyError(f"columns {start}..{end} cut scale groups of {g}: K={k} does not split into parts "
                        f"of whole groups")
    if fmt.share > 1 and start % fmt.share:
        raise ExmyError(f"columns {start}..{end} cut {fmt.name}'s groups of {fmt.share} shared bits")
    out = None
    if packed is not None:
        codes = unpack_codes(packed.reshape(-1, packed.shape[-1]), fmt, k)[:, start:end]
        out = torch.from_numpy(np.ascontiguousarray(pack_codes(codes.cpu().numpy(), fmt))).to(packed.device)
    if ngroups == 1:
        return out, scale, length
    return out, None if scale is None else scale[:, start // g: -(-end // g)].contiguous(), g
