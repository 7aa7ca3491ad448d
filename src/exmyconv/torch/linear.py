"""ExmyLinear: an ``nn.Linear`` whose weight stays packed ExMy and is decoded per call.

Used by the transformers integration (and the next integrations). The CPU path decodes with the torch
codec and calls ``F.linear``; on CUDA the fused kernels of :mod:`exmyconv.cuda` run when they apply.

Under ``torch.compile`` the layer is one custom op, ``torch.ops.exmyconv.linear`` (with a fake
implementation for tracing), so a compiled model keeps the fused kernels instead of breaking its graph
at the CuPy launch; outputs are allocated by torch, so CUDA graphs (``mode="reduce-overhead"``) capture
the launches. The op finds its module through an integer handle (modules cannot be op arguments): the
module keeps the GPU view of its buffers, so the view dies with it.
"""
from __future__ import annotations

import functools
import itertools
import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import cuda
from ..cuda.gpu import row_permuted, tile_permuted
from ..cuda.launch import PDL_CAPABILITY, torch_stream
from ..errors import ExmyError
from ..format.exmy import ExMy, get_format
from ..format.pack import row_bytes
from ..format.quant import groups_of
from .codec import SCALE_NAME, dequantize, scale_values, widened_scales

_LIVE: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()  # handle -> module
_HANDLES = itertools.count()


def register_handle(module) -> int:
    """A new integer handle through which an op finds ``module`` (ExmyLinear, ExmyExperts,
    PackedLinear): modules cannot be op arguments, and copies and unpickled modules need handles of
    their own. The registry holds no reference: the op fails once the module is gone."""
    handle = next(_HANDLES)
    _LIVE[handle] = module
    return handle


def live_module(handle: int, op: str):
    module = _LIVE.get(handle)
    if module is None:
        raise ExmyError(f"exmyconv::{op}: layer {handle} no longer exists; compile the model again")
    return module


def _gpu_backend():
    """exmyconv.cuda.gpu when the CUDA path can run here, else None (the one probe, cached)."""
    return cuda.backend()


def gpu_view(gpu, packed: torch.Tensor, scale: torch.Tensor, fmt: ExMy, k: int, group_size: int,
             scale_exp: int | None = None, order: str = "row"):
    """``gpu.upload`` of packed CUDA tensors (uint8 [N, row_bytes] in ``order``: "row", the file's, or
    "tile", see :func:`tile_ordered`; fp16/bf16 scales [N, ngroups]) that a module or an engine holds:
    a zero-copy view (plus the small scale arrays the GEMV derives).
    ExmyLinear and :class:`exmyconv.torch.packed.PackedLinear` both call it. 8-bit scales
    (float8_e4m3fn with ``scale_exp``) are widened exactly to 16 bits (a copy of the scales only)."""
    wide = None
    if scale_exp is not None:
        scale = wide = widened_scales(scale, scale_exp, fmt)
    weight = gpu.upload(payload=packed, scales=scale, scale_dtype=SCALE_NAME[scale.dtype], fmt=fmt,
                        shape=(packed.shape[0], k), group_size=group_size, order=order, payload_order=order)
    if wide is not None:
        weight._cache["widened_scales"] = wide  # the GPU view reads this tensor's memory
    return weight


def followed_dtype(fn, dtype: torch.dtype) -> torch.dtype:
    """The floating dtype a ``Module._apply`` function (``.to(dtype)``, ``.half()``, ``.cuda()``...) turns
    ``dtype`` into: the packed modules follow it with the dtype they decode to."""
    try:
        probe = fn(torch.empty(0, dtype=dtype))
    except Exception:
        return dtype
    return probe.dtype if isinstance(probe, torch.Tensor) and probe.is_floating_point() else dtype


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """A floating tensor viewed as integers of its width: ``.to(dtype)`` leaves its bits alone (how the
    modules keep stored scales unrounded)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def apply_keeping_scales(module: nn.Module, fn, recurse: bool, apply, scales=("weight_scale",)):
    """``Module._apply`` of the packed modules (ExmyLinear, ExmyEmbedding, ExmyExperts), ``apply`` being
    ``super()._apply``: ``.to(device)`` moves every buffer; ``.to(dtype)`` / ``.half()`` set the dtype
    the module decodes to (``weight_dtype``) and never round the stored scales (bf16 -> fp16 is
    lossy), which pass through ``fn`` as integer bit patterns."""
    module.weight_dtype = followed_dtype(fn, module.weight_dtype)
    kept = {}
    for name in scales:
        scale = module._buffers.get(name)
        if scale is not None and scale.is_floating_point():
            kept[name] = scale.dtype
            module._buffers[name] = as_bits(scale)
    try:
        return apply(fn, recurse)
    finally:
        for name, dtype in kept.items():
            moved = module._buffers[name]
            if not moved.is_floating_point():
                module._buffers[name] = moved.view(dtype)


def kernel_rows(packed: torch.Tensor) -> torch.Tensor:
    """``packed`` [..., row_bytes] with every row 16-byte aligned, so that the GPU kernels read it in
    place: the tensor itself where its rows already are (K a multiple of 128 with unshared codes:
    row_bytes a multiple of 16), else a copy laid out ``cuda.gpu.kernel_stride`` bytes per row (a
    [..., row_bytes] view of wider storage: < 16 bytes per row more, not a second copy of the
    weight). CPU tensors are returned as they are. Modules call it when their buffers reach the GPU."""
    rb = packed.shape[-1]
    stride = -(-rb // 16) * 16
    if not packed.is_cuda or packed.dim() < 2 or (packed.stride(-2) % 16 == 0 and packed.stride(-1) == 1
                                                    and packed.data_ptr() % 16 == 0):
        return packed
    wide = torch.zeros((*packed.shape[:-1], stride), dtype=torch.uint8, device=packed.device)
    wide[..., :rb] = packed
    return wide[..., :rb]


def tile_ordered(gpu, packed: torch.Tensor, fmt: ExMy, k: int, routed: bool = False) -> torch.Tensor | None:
    """A module's packed buffer [N, row_bytes] as a new tensor of the same bytes in tile order
    (``gpu.tile_permuted``: each 16-row tile's bytes together, the order the GEMV reads fastest;
    docs/kernels.md), where the GPU backend ``gpu`` runs and ``gpu.tile_order_applies`` (``routed``:
    stacked experts); else None. Never while a CUDA graph is being captured (the copy would be replayed)."""
    if gpu is None or not gpu.supports(fmt) or packed.dim() != 2 \
            or not gpu.tile_order_applies(fmt, packed.shape[0], k, routed) \
            or (packed.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    return tile_permuted(packed, fmt, k, torch)


def tiled_after_load(packed: torch.Tensor, tiled: torch.Tensor | None, given: torch.Tensor | None, fmt: ExMy,
                     k: int) -> bool:
    """After ``load_state_dict``: whether a module's packed buffer ``packed`` (rows [..., row_bytes]) is still in
    tile order. ``tiled``: the buffer that was in tile order before the load, or None; ``given``: the state
    dict's tensor for it. A load into that buffer in place (row order, the file's) is laid out in tile order
    again, in place (a sibling group's member: its rows are a view of the group's buffer); a new tensor
    (``assign=True``) is in row order."""
    if tiled is None or packed is not tiled:
        return False
    if given is not None and given.shape == packed.shape:
        rows = packed.view(-1, packed.shape[-1])
        rows.copy_(tile_permuted(rows, fmt, k, torch))
    return True


class ExmyLinear(nn.Module):
    """A Linear layer whose weight stays packed ExMy (formats/SPEC.md) and is decoded per call.

    Buffers ``weight_packed`` (uint8 [out_features, row_bytes]) and ``weight_scale`` (the stored
    fp16/bf16 [out_features, ngroups]) hold exactly the checkpoint's ``<module>.weight_packed`` /
    ``<module>.weight_scale``; ``bias`` is an ordinary parameter. ``fmt``, ``group_size`` (G) and
    ``in_features`` (K) are the record's parameters.

    forward(x): on a CUDA input, :meth:`_gpu_forward` (fused kernels of ``exmyconv.cuda.gpu``) when it
    applies; otherwise the weight is dequantized to ``x.dtype`` and ``F.linear(x, W, bias)`` runs.
    Nothing is cached: the dequantized weight lives only during the call (memory stays at the
    packed size; a cache would cost the full-precision size). Set ``ExmyLinear.gpu_kernels =
    False`` (or environment ``EXMYCONV_GPU_KERNELS=0``) to use the dequantize + F.linear path on
    CUDA as well.

    ``weight`` is a read-only property for code that inspects ``module.weight`` (its dtype,
    device, shape — e.g. T5's feed-forward): each access dequantizes a fresh copy in
    ``weight_dtype`` (the dtype the model was loaded in; follows ``.to(dtype)``). Writing into
    it changes nothing.

    On the GPU, where the fused kernels run, :meth:`align_rows` replaces ``weight_packed`` by its bytes in
    tile order (:func:`tile_ordered`), the order the GEMV reads fastest; the layer keeps track, and
    ``state_dict()``, :meth:`dequantize_weight` and ``.to()`` give the file's row order back. Write new
    weights through ``load_state_dict``, not into the buffer itself.
    """

    gpu_kernels: bool = os.environ.get("EXMYCONV_GPU_KERNELS", "1") != "0"
    _may_tile: bool = True  # align_rows may reorder the buffer into tile order (a sibling group decides for its own)
    _siblings = None  # (SiblingGroup, index) while the layer is computed with its siblings (torch.siblings)

    def __init__(self, in_features: int, out_features: int, fmt: ExMy | str, group_size: int | None = None,
                 bias: bool = True, scale_dtype: torch.dtype = torch.float16, device=None,
                 dtype: torch.dtype | None = None, scale_exp: int | None = None):
        super().__init__()
        self.weight_dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        self.group_size, ngroups = groups_of(self.in_features, group_size)
        if (scale_dtype == torch.float8_e4m3fn) != (scale_exp is not None) or (
                scale_dtype not in SCALE_NAME and scale_dtype != torch.float8_e4m3fn):
            raise ExmyError(f"scales are float16 or bfloat16, or float8_e4m3fn with a scale_exp; not {scale_dtype} "
                            f"with scale_exp {scale_exp}")
        self.scale_exp = scale_exp  # 8-bit scales: the tensor's power of two (SPEC section 2)
        self.scale_format = SCALE_NAME.get(scale_dtype, "F8_E4M3")  # what the checkpoint stores
        self.register_buffer("weight_packed", torch.empty(
            (self.out_features, row_bytes(self.fmt, self.in_features)), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty((self.out_features, ngroups), dtype=scale_dtype,
                                                         device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._gpu_weight_cache = None
        self._launches = {}
        self._tiled = None  # weight_packed while its bytes are in tile order (tile_ordered), else None
        self._register()

    def _register(self) -> None:
        """A handle of its own for the compiled op (copies and unpickled modules get a new one)."""
        self._handle = register_handle(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_tiled", None)  # (pickled before tile order)
        self._gpu_weight_cache = None
        self._launches = {}
        self._register()

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: ExMy | str, group_size: int | None,
                    scale_dtype: torch.dtype = torch.float16, scale_exp: int | None = None) -> "ExmyLinear":
        """An ExmyLinear for ``linear``'s shape and device, reusing its bias parameter (not its weight)."""
        new = cls(linear.in_features, linear.out_features, fmt, group_size, bias=False, scale_dtype=scale_dtype,
                  device=linear.weight.device, dtype=linear.weight.dtype, scale_exp=scale_exp)
        new.bias = linear.bias  # the same Parameter object (or None): loads like the original's
        return new

    def extra_repr(self) -> str:
        g = "" if self.group_size == self.in_features else f", group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}{g}, "
                f"scales={self.scale_format}, bias={self.bias is not None}")

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out_features, in_features] as ``dtype`` (default ``weight_dtype``), a new tensor."""
        return dequantize(self.in_row_order(self.weight_packed), scale_values(self.weight_scale, self.scale_exp),
                          self.fmt, self.in_features, self.group_size, dtype or self.weight_dtype)

    def in_row_order(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed`` in the file's row order: a row-order copy where it is this layer's buffer held in
        tile order, else ``packed`` itself (what the op's other paths decode with the torch codec)."""
        tiled = self._tiled
        if tiled is None or packed.data_ptr() != tiled.data_ptr() or packed.shape != tiled.shape:
            return packed
        return row_permuted(packed, self.fmt, self.in_features, torch)

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized copy in ``weight_dtype`` (for code that inspects ``.weight``; costs a decode)."""
        return self.dequantize_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = x.requires_grad and torch.is_grad_enabled()
        siblings = self._siblings
        if siblings is not None and not grad:  # one GEMV with q/k/v (gate/up): exmyconv.torch.siblings
            y = siblings[0].output(siblings[1], x)
            if y is not None:
                bias = self._parameters["bias"]
                return y if bias is None else y + bias.to(y.dtype)
        # The op: one opaque node in a compiled graph (see the module docstring), and in eager mode
        # the way to x's gradient (the fused GEMV records nothing for autograd; the op's backward
        # multiplies by the dequantized weight). Inference (no_grad, generate()) calls _forward.
        if torch.compiler.is_compiling() or grad:
            return torch.ops.exmyconv.linear(x, self.weight_packed, self.weight_scale, self.bias, self._handle)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.gpu_kernels:
            y = self._gpu_forward(x)
            if y is not None:
                return y
        # CPU (and fallback) path: decode to the compute dtype, then the same F.linear as nn.Linear.
        return F.linear(x, self.dequantize_weight(x.dtype), self.bias)

    # -- GPU hook ----------------------------------------------------------------------------
    def _gpu_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The CUDA path, or None to fall back to dequantize + F.linear.

        Runs when ``exmyconv.cuda.gpu`` imports and ``exmyconv.cuda.gpu.available()``, x and the buffers are
        on CUDA, x is fp16/bf16, and the backend handles the format (``exmyconv.cuda.gpu.supports(fmt)``
        if it defines it, else unshared formats only). Then :meth:`_gpu_compute`.
        """
        gpu = _gpu_backend()
        packed = self._buffers["weight_packed"]  # (not Module.__getattr__: ~1 us per call)
        if gpu is None or x.dtype not in SCALE_NAME or not packed.is_cuda or not gpu.supports(self.fmt):
            return None
        return self._gpu_compute(gpu, x)

    def _gpu_compute(self, gpu, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b with the GPU backend ``gpu`` (exmyconv.cuda.gpu's API):

        - rows of x (leading dims flattened) <= ``gpu.MAX_BATCH`` (16): the fused GEMV through a
          ``gpu.GemvLaunch`` prepared once per (rows, dtype) and kept by the layer, so a call costs
          one output allocation and one driver launch (no planning; programmatic dependent launch on
          compute capability >= 9.0; bf16 x at 2..16 rows on large layers and fp16 x at 9..16 rows: a
          second launch laying x out as x tiles, and its workspace, :func:`call_gemv`), then the bias
          is added;
        - more rows: ``weight.dequantize("F16"|"BF16", out=w)`` (bit-exact) into a torch buffer, on
          torch's current stream (a side stream, a CUDA-graph capture), then ``F.linear``: the same
          result as the plain model.

        Every output is allocated by torch (CUDA-graph capture needs that; CuPy's pool is not captured).
        This runs per layer and token in eager decoding, where the host is the bottleneck: x and y stay
        in their N-d shapes (the kernel sees their contiguous rows; no reshapes).
        """
        weight = self._gpu_weight(gpu)
        rows = x.numel() // self.in_features
        # (the rule PackedLinear follows too; a wrong last dimension gets F.linear's error below)
        if x.shape[-1] == self.in_features and gpu.gemv_applies(self.fmt, SCALE_NAME[x.dtype], rows):
            launch = self._launches.get((rows, x.dtype))
            if launch is None:
                launch = self._launches[(rows, x.dtype)] = gpu.GemvLaunch(
                    weight, SCALE_NAME[x.dtype], rows, overlap=pdl_ok(x.device))
            y = run_gemv(launch, x, self.out_features)
            bias = self._parameters["bias"]  # a Parameter or None (from_linear's too)
            return y if bias is None else y + bias.to(y.dtype)
        w = torch.empty((self.out_features, self.in_features), dtype=x.dtype, device=x.device)
        weight.dequantize(SCALE_NAME[x.dtype], out=w)  # on torch's current stream (capturable)
        return F.linear(x, w, self.bias)

    def _gpu_weight(self, gpu):
        """``gpu.upload(...)`` of the buffers, kept while they stay where they are.

        The buffers are already on the GPU, so this is a zero-copy view (plus the small scale
        arrays the GEMV derives), not a dequantized copy.
        """
        buffers = self._buffers  # (not Module.__getattr__: this runs per call)
        cache = self._gpu_weight_cache
        key = (buffers["weight_packed"].data_ptr(), buffers["weight_scale"].data_ptr(), buffers["weight_scale"].dtype)
        if cache is None or cache[0] != key:  # new or moved buffers (aligned once here)
            self.align_rows(gpu)
            packed = self.weight_packed
            key = (packed.data_ptr(), self.weight_scale.data_ptr(), self.weight_scale.dtype)
            weight = gpu_view(gpu, packed, self.weight_scale, self.fmt, self.in_features, self.group_size,
                              self.scale_exp, "tile" if self._tiled is packed else "row")
            cache = self._gpu_weight_cache = (key, weight)
            self._launches = {}  # prepared launches hold the old buffers' addresses
        return cache[1]

    def align_rows(self, gpu=None) -> None:
        """On the GPU, lay ``weight_packed`` out as the kernels read it: 16-byte aligned rows
        (:func:`kernel_rows`) and, where ``gpu`` (default: the GPU backend, if it runs here) takes it, tile
        order (:func:`tile_ordered`). The loaders call it once the weights are in place, before any
        compiled graph captures them; the first CUDA call does otherwise."""
        packed = kernel_rows(self.weight_packed)
        if packed is not self.weight_packed:
            self.weight_packed = packed
        if self._tiled is not packed and self._may_tile:  # (a new buffer: in row order)
            self._tiled = None
            if gpu is None and packed.is_cuda and self.gpu_kernels:
                gpu = _gpu_backend()
            tiled = tile_ordered(gpu, packed, self.fmt, self.in_features)
            if tiled is not None:
                self.weight_packed = self._tiled = tiled

    def _to_row_order(self) -> None:
        """The buffer back in the file's row order (before it moves)."""
        packed = self._buffers["weight_packed"]
        if self._tiled is packed:
            self._buffers["weight_packed"] = row_permuted(packed, self.fmt, self.in_features, torch)
        self._tiled = None
        self._gpu_weight_cache = None
        self._launches = {}

    # -- state dicts: the file's row order in and out ---------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight_packed"
        if self._tiled is not None and key in destination:
            destination[key] = self.in_row_order(destination[key])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Row order in, laid out again (:func:`tiled_after_load`)."""
        tiled = self._tiled
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not tiled_after_load(self._buffers["weight_packed"], tiled, state_dict.get(prefix + "weight_packed"),
                                self.fmt, self.in_features):
            self._tiled = None
        self._gpu_weight_cache = None
        self._launches = {}

    # -- dtype safety ------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """``.to(...)``: :func:`apply_keeping_scales` over the buffer in row order; then the GPU layout and
        caches are redone (and the layer leaves its sibling group: its buffers may move apart)."""
        if self._siblings is not None:
            self._siblings[0].dissolve()
        self._to_row_order()
        try:
            return apply_keeping_scales(self, fn, recurse, super()._apply)
        finally:
            self.align_rows()
            self._gpu_weight_cache = None
            self._launches = {}


def run_gemv(launch, x: torch.Tensor, n: int) -> torch.Tensor:
    """y [..., n] = ``launch`` (a ``gpu.GemvLaunch`` prepared for x's rows and dtype) of x [..., K], in a
    new torch tensor (CUDA graphs capture only torch's allocations), on torch's current stream. The
    kernel reads the rows of x in place, as 16-byte words: x is copied only when they are not
    contiguous from a 16-byte aligned address. No reshapes: ExmyLinear and PackedLinear call this
    per layer and token, where eager decoding is bound by the host."""
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    call_gemv(launch, x.data_ptr(), y.data_ptr(), x.device, torch_stream(x.device))
    return y


def call_gemv(launch, x_ptr: int, y_ptr: int, device: torch.device, stream: int) -> None:
    """``launch`` (a ``gpu.GemvLaunch``) of x into y on ``stream`` (torch's current stream of ``device``),
    with the workspace it may need (``work_bytes``: x tiles, written by a kernel before the GEMV) taken from torch's
    allocator for this call: stream-ordered, so it is safe on any stream and inside CUDA-graph capture."""
    if launch.work_bytes:
        work = torch.empty(launch.work_bytes, dtype=torch.uint8, device=device)
        launch(x_ptr, y_ptr, stream, work.data_ptr())
    else:
        launch(x_ptr, y_ptr, stream)


@functools.lru_cache(maxsize=None)
def pdl_ok(device: torch.device) -> bool:
    """Programmatic dependent launch needs compute capability >= 9.0 (exmyconv.cuda.launch); the GEMV
    launches of ExmyLinear and PackedLinear use it where it applies."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= PDL_CAPABILITY


# ----------------------------------------------------------------------------- the compiled op

@torch.library.custom_op("exmyconv::linear", mutates_args=())
def linear_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
              handle: int) -> torch.Tensor:
    """y = x W^T + bias for the packed weight of ``ExmyLinear`` number ``handle`` (its buffers are the
    tensor arguments, so the graph sees the dependency; the module supplies the format and, on CUDA,
    its cached GPU view). Inputs that are not the module's own buffers are computed from as given."""
    module = live_module(handle, "linear")
    if module.weight_packed.data_ptr() == packed.data_ptr() and module.weight_scale.data_ptr() == scale.data_ptr() \
            and module.bias is bias:
        return module._forward(x)
    w = dequantize(module.in_row_order(packed), scale_values(scale, module.scale_exp), module.fmt, module.in_features,
                   module.group_size, x.dtype)
    return F.linear(x, w, bias)


@linear_op.register_fake
def _(x, packed, scale, bias, handle):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _setup_context(ctx, inputs, output):
    x, packed, scale, bias, handle = inputs
    ctx.save_for_backward(packed, scale)
    ctx.handle, ctx.has_bias, ctx.dtype = handle, bias is not None, x.dtype


@torch.library.custom_op("exmyconv::dequantize", mutates_args=())
def dequantize_op(packed: torch.Tensor, scale: torch.Tensor, handle: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight of ``ExmyLinear`` number ``handle`` as ``dtype`` (an op, so that backward traces)."""
    module = live_module(handle, "dequantize")
    return dequantize(module.in_row_order(packed), scale_values(scale, module.scale_exp), module.fmt,
                      module.in_features, module.group_size, dtype)


@dequantize_op.register_fake
def _(packed, scale, handle, dtype):
    return packed.new_empty((packed.shape[0], live_module(handle, "dequantize").in_features), dtype=dtype)


def _backward(ctx, grad):
    """Gradients for x and the bias (the packed weight is frozen): adapters on top of a packed model train."""
    packed, scale = ctx.saved_tensors
    w = torch.ops.exmyconv.dequantize(packed, scale, ctx.handle, grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad @ w, None, None, grad_bias, None


linear_op.register_autograd(_backward, setup_context=_setup_context)
