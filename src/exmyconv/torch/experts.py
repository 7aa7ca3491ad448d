"""ExmyExperts: the experts of a mixture-of-experts layer, every expert's weights kept packed ExMy.

transformers keeps the experts of a MoE layer (Qwen3-MoE, Qwen2-MoE, Mixtral, ...) in one module with
two 3-D parameters, ``gate_up_proj`` [E, 2I, H] (each expert's gate rows, then its up rows) and
``down_proj`` [E, H, I], called as ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights
[T, k])``. ExmyExperts is that module with the parameters replaced by buffers that hold the
checkpoint's packed tensors unchanged (formats/SPEC.md: a 3-D tensor's rows are its leading dims):

- ``gate_up_proj_packed`` uint8 [E, 2I, row_bytes(H)], ``gate_up_proj_scale`` [E, 2I, ngroups]
- ``down_proj_packed`` uint8 [E, H, row_bytes(I)], ``down_proj_scale`` [E, H, ngroups]

(scales fp16/bf16, or e4m3 with one power of two per projection, as stored). Each projection has its
own format and group size. Only these stay
resident: an expert's weights are decoded per call, for the experts the tokens were routed to. On the
GPU a projection's packed buffer is replaced by the same bytes in tile order (:meth:`ExmyExperts.align_rows`,
``linear.tile_ordered``; each expert's rows whole 16-row tiles), as ExmyLinear does; ``state_dict()``,
``dequantize_weight()`` and ``.to()`` give the file's row order back.

forward, per routed expert, on just the tokens routed to it:

- CPU (and any input the CUDA path does not take): the expert's two weights are decoded into the
  activation dtype by the torch codec (bitwise what ``exmyconv dequantize`` writes) and the same
  operations as transformers' eager experts forward run in the same order, so the output equals the
  plain model's (loaded with ``experts_implementation="eager"``) bit for bit.
- CUDA (fp16/bf16 activations, formats the kernels handle), decoding (at most
  :meth:`ExmyExperts.routed_pairs` (token, expert) pairs: few of them share an expert): each
  projection is one routed GEMV over all pairs (``gpu.RoutedGemvLaunch``: the kernel reads the expert
  ids from device memory, pair p reads its token's row and writes its own output row), so the
  routing never visits the host: no synchronisation, and a CUDA graph captured once
  (``torch.compile(mode="reduce-overhead")``, ``torch.cuda.graph``) serves every routing.
- CUDA, more pairs: the routing is read on the host once per call, pairs are sorted by expert and
  each routed expert's rows go through the fused GEMV when they are at most ``gpu.MAX_BATCH`` (16),
  written straight into the rows of one output, else through
  :class:`exmyconv.torch.packed.PackedLinear`'s CUDA path (a bit-exact dequantization into the
  shared scratch buffer, then a matmul). The activation and the weighted sum run once over all
  pairs. Inside CUDA-graph capture the routed GEMV runs whatever the number of pairs.

  The GEMV of all experts of a projection is one prepared launch per (rows, dtype) (:class:`_StackedGemv`):
  it is made for expert 0's slice, and each call points its weight arguments at the routed expert's
  payload and scales (all experts have the same shape and layout), so a routed expert costs one
  driver launch and no per-expert preparation. This reads two arguments of ``gpu.GemvLaunch``
  (payload, kernel scales: checked when a launch is made; if the kernel's arguments change, each
  expert gets its own PackedLinear instead). The routing read on the host is a synchronisation per
  layer.

Under ``torch.compile`` the module is one custom op, ``torch.ops.exmyconv.experts`` (a fake
implementation gives its shape), so the graph does not break at the experts (``fullgraph=True``
holds); when an input needs gradients the forward runs untraced instead (a graph break), as before.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import cuda
from ..cuda.launch import torch_stream
from ..errors import ExmyError
from ..format.exmy import ExMy, get_format
from ..format.pack import row_bytes
from ..format.quant import groups_of
from ..cuda.gpu import row_permuted
from .codec import SCALE_NAME, dequantize, scale_values, widened_scales
from .linear import (apply_keeping_scales, call_gemv, gpu_view, kernel_rows, live_module, pdl_ok, register_handle,
                     tile_ordered, tiled_after_load)
from .packed import PackedLinear

PROJECTIONS = ("gate_up_proj", "down_proj")
PACKED_BUFFERS = tuple(name + leaf for name in PROJECTIONS for leaf in ("_packed", "_scale"))  # the op's order


class ExpertWeights:
    """One projection's parameters: ``fmt``, K (``k``, the input width), N (``n``, rows per expert),
    G (``group_size``), the stored scale dtype and, for 8-bit scales (float8_e4m3fn), the stack's
    power of two ``scale_exp`` (formats/SPEC.md section 2; one for every expert of the stack)."""

    def __init__(self, fmt: ExMy | str, k: int, n: int, group_size: int | None, scale_dtype: torch.dtype,
                 scale_exp: int | None = None):
        self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        self.k, self.n = int(k), int(n)
        self.group_size, self.ngroups = groups_of(self.k, group_size)
        if (scale_dtype == torch.float8_e4m3fn) != (scale_exp is not None) or (
                scale_dtype not in SCALE_NAME and scale_dtype != torch.float8_e4m3fn):
            raise ExmyError(f"scales are float16 or bfloat16, or float8_e4m3fn with a scale_exp; not {scale_dtype} "
                            f"with scale_exp {scale_exp}")
        self.scale_dtype, self.scale_exp = scale_dtype, scale_exp

    def __repr__(self):
        g = "" if self.group_size == self.k else f"-g{self.group_size}"
        scales = SCALE_NAME.get(self.scale_dtype) or f"F8_E4M3 x 2^{self.scale_exp}"
        return f"{self.fmt.name}{g} [{self.n}, {self.k}] scales {scales}"


class ExmyExperts(nn.Module):
    """A MoE experts module whose expert weights stay packed (see the module docstring).

    ``num_experts`` E, ``gate_up`` / ``down``: the :class:`ExpertWeights` of ``gate_up_proj`` (K = H,
    N = 2I) and ``down_proj`` (K = I, N = H); ``act_fn`` the gate's activation (the experts module's
    own). Set ``ExmyExperts.gpu_kernels = False`` (or ``EXMYCONV_GPU_KERNELS=0``) to run the CPU
    path on CUDA as well.
    """

    gpu_kernels: bool = os.environ.get("EXMYCONV_GPU_KERNELS", "1") != "0"

    def __init__(self, num_experts: int, gate_up: ExpertWeights, down: ExpertWeights, act_fn, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if gate_up.n != 2 * down.k or down.n != gate_up.k:
            raise ExmyError(f"experts: gate_up_proj {gate_up} and down_proj {down} do not fit together")
        self.num_experts = int(num_experts)
        self.hidden_dim, self.intermediate_dim = gate_up.k, down.k
        self.weights = {"gate_up_proj": gate_up, "down_proj": down}
        self.act_fn = act_fn
        self.weight_dtype = dtype or torch.get_default_dtype()  # what `dequantize_weight` gives by default
        for name, w in self.weights.items():
            self.register_buffer(name + "_packed", torch.empty(
                (self.num_experts, w.n, row_bytes(w.fmt, w.k)), dtype=torch.uint8, device=device))
            self.register_buffer(name + "_scale", torch.empty((self.num_experts, w.n, w.ngroups),
                                                              dtype=w.scale_dtype, device=device))
        self._tiled: dict = {}  # projection -> its packed buffer while in tile order (align_rows)
        self._reset_cuda()
        self._handle = register_handle(self)  # for the compiled op

    def _reset_cuda(self):
        self._specs: dict = {}  # (projection, expert) -> PackedLinear (more rows than a GEMV takes)
        self._gemvs: dict = {}  # projection -> _StackedGemv (or None: the GEMV does not apply)
        self._wide: dict = {}  # projection -> its 8-bit scales widened to 16 bits (what the kernels read)

    @classmethod
    def over(cls, gate_up: ExpertWeights, down: ExpertWeights, act_fn, tensors: dict, dtype: torch.dtype):
        """An ExmyExperts computing with packed tensors an engine owns (``tensors``: PACKED_BUFFERS name ->
        tensor of the buffer's shape and dtype), used in place: no copy, nothing allocated."""
        e = tensors["gate_up_proj_packed"].shape[0]
        module = cls(e, gate_up, down, act_fn, device="meta", dtype=dtype)
        for name in PACKED_BUFFERS:
            want, got = module._buffers[name], tensors[name]
            if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                raise ExmyError(f"experts: {name} must be {want.dtype} {list(want.shape)}, got {got.dtype} "
                                f"{list(got.shape)}")
            module._buffers[name] = got
        return module

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_tiled", {})  # (pickled before tile order)
        self._reset_cuda()
        self._handle = register_handle(self)  # copies and unpickled modules get their own

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, gate_up_proj={self.weights['gate_up_proj']}, "
                f"down_proj={self.weights['down_proj']}")

    def dequantize_weight(self, name: str, expert: int | None = None, dtype: torch.dtype | None = None):
        """Projection ``name``'s weight of one expert [N, K] (or of all, [E, N, K]) as ``dtype``, a new tensor."""
        w = self.weights[name]
        packed, scale = self._row_order(name), self._buffers[name + "_scale"]
        if expert is not None:
            packed, scale = packed[expert], scale[expert]
        return dequantize(packed, scale_values(scale, w.scale_exp), w.fmt, w.k, w.group_size,
                          dtype or self.weight_dtype)

    # -- the GPU layout: tile order -----------------------------------------------------------------
    def order(self, name: str) -> str:
        """The byte order projection ``name``'s packed buffer is in: "tile" (align_rows) or "row"."""
        return "tile" if self._tiled.get(name) is self._buffers[name + "_packed"] else "row"

    def _row_order(self, name: str) -> torch.Tensor:
        """Projection ``name``'s packed buffer in row order: itself, or a row-order copy."""
        packed, w = self._buffers[name + "_packed"], self.weights[name]
        if self.order(name) == "row":
            return packed
        return row_permuted(packed.reshape(-1, packed.shape[-1]), w.fmt, w.k, torch).view(packed.shape)

    def align_rows(self, gpu=None) -> None:
        """On the GPU, lay each projection's packed buffer out as the kernels read it: 16-byte aligned rows
        (``linear.kernel_rows``) and, where ``gpu`` (default: the GPU backend, if it runs here) takes it and
        each expert's rows are whole 16-row tiles, tile order (``linear.tile_ordered``). The transformers
        loader calls it once the weights are in place, and so does ``.to()``; the first CUDA call does otherwise."""
        if gpu is None and self.gate_up_proj_packed.is_cuda and self.gpu_kernels:
            gpu = cuda.backend()
        for name, w in self.weights.items():
            packed = kernel_rows(self._buffers[name + "_packed"])  # (a view of wider rows where it must)
            if packed is not self._buffers[name + "_packed"]:
                self._buffers[name + "_packed"] = packed
                self._gemvs, self._specs = {}, {}
            if self._tiled.get(name) is packed:
                continue
            self._tiled.pop(name, None)
            tiled = tile_ordered(gpu, packed.view(-1, packed.shape[-1]), w.fmt, w.k, routed=True) \
                if w.n % 16 == 0 and packed.is_contiguous() else None
            if tiled is not None:
                self._buffers[name + "_packed"] = self._tiled[name] = tiled.view(packed.shape)
                self._gemvs, self._specs = {}, {}  # (what was prepared for the buffer in row order)

    def _to_row_order(self) -> None:
        for name in list(self._tiled):
            if self.order(name) == "tile":
                self._buffers[name + "_packed"] = self._row_order(name)
        self._tiled = {}
        self._reset_cuda()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._tiled:
            if self.order(name) == "tile" and prefix + name + "_packed" in destination:
                destination[prefix + name + "_packed"] = self._row_order(name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Row order in, laid out again (``linear.tiled_after_load``)."""
        tiled = dict(self._tiled)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name, t in tiled.items():
            w, key = self.weights[name], prefix + name + "_packed"
            if not tiled_after_load(self._buffers[name + "_packed"], t, state_dict.get(key), w.fmt, w.k):
                self._tiled.pop(name, None)
        self._reset_cuda()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad):
                return _untraced_forward(self, hidden_states, top_k_index, top_k_weights)  # (the op has no backward)
            return torch.ops.exmyconv.experts(hidden_states, top_k_index, top_k_weights, *self._packed_buffers(),
                                              self._handle)
        return self._forward(hidden_states, top_k_index, top_k_weights)

    def _packed_buffers(self) -> list:
        return [self._buffers[name] for name in PACKED_BUFFERS]

    def _forward(self, hidden_states, top_k_index, top_k_weights):
        # The fused GEMVs record nothing for autograd: where a gradient is needed (adapters trained on
        # a packed model, a trainable router), the decode + F.linear path, which autograd follows.
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad)
        if hidden_states.is_cuda and self.gpu_kernels and hidden_states.dtype in SCALE_NAME \
                and self.gate_up_proj_packed.is_cuda and not needs_grad:
            return self._cuda_forward(hidden_states, top_k_index, top_k_weights)
        return self._eager_forward(hidden_states, top_k_index, top_k_weights)

    def _eager_forward(self, hidden_states, top_k_index, top_k_weights):
        """transformers' eager experts forward, each routed expert's weights decoded for the call."""
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in expert_hit[:, 0].tolist():
            if expert == self.num_experts:  # (expert-parallel sentinel)
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            current = hidden_states[token_idx]
            gate_up = self.dequantize_weight("gate_up_proj", expert, hidden_states.dtype)
            gate, up = F.linear(current, gate_up).chunk(2, dim=-1)
            del gate_up
            current = self.act_fn(gate) * up
            current = F.linear(current, self.dequantize_weight("down_proj", expert, hidden_states.dtype))
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, current.to(final.dtype))
        return final

    # -- CUDA ------------------------------------------------------------------------------------
    def routed_pairs(self, top_k: int) -> int:
        """The most (token, expert) pairs the routed GEMV takes outside CUDA-graph capture: half the
        experts (at least top-k, one token). Each pair reads its expert's weights, so an expert chosen
        by several pairs is read several times; at E/2 pairs drawn at random the expected reads are
        about 1.27x the distinct experts' (0.5 / (1 - e^-0.5)), the price of never reading the routing
        on the host. Beyond that the grouped path reads each routed expert once."""
        return max(top_k, self.num_experts // 2)

    def _cuda_forward(self, hidden_states, top_k_index, top_k_weights):
        tokens, k = top_k_index.shape
        capturing = torch.cuda.is_current_stream_capturing()  # a CUDA graph: the routing must stay on the device
        if capturing or tokens * k <= self.routed_pairs(k):
            y = self._routed_forward(hidden_states, top_k_index, top_k_weights)
            if y is not None:
                return y
            if capturing:
                raise ExmyError("these experts cannot be captured in a CUDA graph: the routed GEMV does not take "
                                f"{self.weights} with {hidden_states.dtype} activations")
        ids = top_k_index.tolist()  # the one host read of the routing
        pairs = [e for row in ids for e in row]
        if not pairs:
            return torch.zeros_like(hidden_states)
        return self._grouped_forward(hidden_states, top_k_index, top_k_weights, pairs)

    def _routed_forward(self, hidden_states, top_k_index, top_k_weights):
        """Every (token, expert) pair in one routed GEMV per projection, the expert ids read on the GPU
        (graph-safe): row t*k+j is token t's j-th expert. None where it does not apply."""
        tokens, k = top_k_index.shape
        pairs, dtype = tokens * k, hidden_states.dtype
        gate_up, down = self._stacked_gemv("gate_up_proj"), self._stacked_gemv("down_proj")
        size = hidden_states.element_size()
        if gate_up is None or down is None or pairs == 0 or self.hidden_dim * size % 16 \
                or self.intermediate_dim * size % 16:
            return None  # (the GEMV reads x rows in 16-byte words)
        x = hidden_states.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()  # (a fresh allocation: aligned)
        first, second = gate_up.routed(pairs, dtype, k), down.routed(pairs, dtype, 1)
        if first is None or second is None:
            return None
        ids = top_k_index.reshape(-1).to(torch.int64).contiguous()
        stream = torch_stream(x.device)
        h2 = torch.empty((pairs, 2 * self.intermediate_dim), dtype=dtype, device=x.device)
        first(ids.data_ptr(), x.data_ptr(), h2.data_ptr(), stream)
        gate, up = h2.chunk(2, dim=-1)
        h = (self.act_fn(gate) * up).contiguous()
        out = torch.empty((pairs, self.hidden_dim), dtype=dtype, device=x.device)
        second(ids.data_ptr(), h.data_ptr(), out.data_ptr(), stream)
        out = out.view(tokens, k, -1) * top_k_weights[..., None].to(dtype)
        return out.sum(dim=1)

    def _grouped_forward(self, hidden_states, top_k_index, top_k_weights, pairs: list):
        """Pairs sorted by expert: each routed expert's rows in one GEMV (<= 16 rows) or one matmul."""
        tokens, k = top_k_index.shape
        expert_ids = top_k_index.reshape(-1)
        sorted_ids, order = torch.sort(expert_ids, stable=True)
        x = hidden_states[order // k]  # [pairs, H], grouped by expert
        segments = _segments(sorted(pairs))  # which experts, how many rows each (the sort is stable)
        gate_up = self._project("gate_up_proj", x, segments)
        gate, up = gate_up.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        out = self._project("down_proj", h, segments)
        out = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
        pairs = torch.empty_like(out)
        pairs[order] = out
        return pairs.view(tokens, k, -1).sum(dim=1).to(hidden_states.dtype)

    def _project(self, name: str, x: torch.Tensor, segments) -> torch.Tensor:
        """y[rows of expert e] = x[those rows] @ W_e^T for each (e, start, end) of ``segments``."""
        w = self.weights[name]
        gemv = self._stacked_gemv(name)  # (first: it lays the buffer out)
        packed, scale = self._buffers[name + "_packed"], self._kernel_scale(name)
        x = x.contiguous()
        y = torch.empty((x.shape[0], w.n), dtype=x.dtype, device=x.device)
        stream = torch_stream(x.device)
        x_row, y_row = x.shape[1] * x.element_size(), w.n * y.element_size()
        for expert, start, end in segments:
            if expert >= self.num_experts:  # (expert-parallel sentinel: no contribution)
                y[start:end].zero_()
                continue
            rows = end - start
            if gemv is not None and (x.data_ptr() + start * x_row) % 16 == 0 and gemv.applies(rows, x.dtype):
                gemv(expert, rows, x.dtype, x.data_ptr() + start * x_row, y.data_ptr() + start * y_row, stream)
                continue
            spec = self._specs.get((name, expert))
            if spec is None:
                spec = self._specs[(name, expert)] = PackedLinear(w.fmt, w.k, w.n, w.group_size)
                spec.order = self.order(name)  # (its rows are whole tiles of the buffer)
            state = spec._cuda_state(packed[expert], scale[expert])
            xs = x[start:end]
            if state is not None and state._gemv(rows, x.dtype):
                xs = xs.clone()  # (a 16-byte aligned copy)
                call_gemv(state._launch(rows, x.dtype), xs.data_ptr(), y[start:end].data_ptr(), x.device, stream)
            elif state is not None:
                torch.mm(xs, state._dequantized(x.dtype).t(), out=y[start:end])
            else:
                y[start:end] = F.linear(xs, spec.dequantize(packed[expert], scale[expert], x.dtype))
        return y

    def _kernel_scale(self, name: str) -> torch.Tensor:
        """Projection ``name``'s scales as the CUDA paths read them: 16-bit as stored, or 8-bit ones
        widened once, exactly, to fp16 or bf16 for the whole stack (codec.widened_scales)."""
        scale, w = self._buffers[name + "_scale"], self.weights[name]
        if w.scale_exp is None:
            return scale
        key = (name, scale.data_ptr())
        if key not in self._wide:
            self._wide[key] = widened_scales(scale, w.scale_exp, w.fmt)
        return self._wide[key]

    def _stacked_gemv(self, name: str) -> "_StackedGemv | None":
        packed, scale = self._buffers[name + "_packed"], self._kernel_scale(name)
        key = (name, packed.data_ptr(), scale.data_ptr())
        if key not in self._gemvs:
            gpu = cuda.backend()
            self.align_rows(gpu)  # (once per buffer: a buffer it replaces gets a new key)
            packed = self._buffers[name + "_packed"]
            key = (name, packed.data_ptr(), scale.data_ptr())
            w = self.weights[name]
            ok = gpu is not None and gpu.supports(w.fmt) and packed.is_cuda and scale.is_contiguous()
            self._gemvs[key] = _StackedGemv(gpu, w, packed, scale, self.order(name)) if ok else None
        return self._gemvs[key]

    # -- dtype safety ------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """``.to(...)``: :func:`exmyconv.torch.linear.apply_keeping_scales` over every projection's scales in
        row order; then the GPU layout (``align_rows``: here, not at a first call that a compiled graph's
        warm-up may make, whose allocations must not outlive it)."""
        self._to_row_order()
        try:
            return apply_keeping_scales(self, fn, recurse, super()._apply, [name + "_scale" for name in PROJECTIONS])
        finally:
            self._reset_cuda()
            self.align_rows()


class _StackedGemv:
    """The fused GEMV of every expert of one projection: per (rows, dtype) one ``gpu.GemvLaunch``
    prepared for expert 0's slice; a call moves its payload and scale arguments to the routed expert's.

    The kernel's mode (how it applies the scales) is chosen for the scales of all experts (the
    whole stack's ``fold_ok``), and its scale argument is the stack's kernel scales, so every expert
    gets what its own launch would be given."""

    def __init__(self, gpu, w: ExpertWeights, packed: torch.Tensor, scale: torch.Tensor, order: str = "row"):
        e, n = packed.shape[:2]
        self.gpu, self.w, self.device = gpu, w, packed.device
        self.stack = gpu_view(gpu, packed.view(e * n, -1), scale.view(e * n, -1), w.fmt, w.k, w.group_size,
                              order=order)
        self.first = self.stack.rows(0, n)  # launches prepared for expert 0, with the whole stack's kernel mode
        self.payload, self.payload_step = self.stack.payload.data.ptr, n * self.stack.payload.strides[0]
        self._keep = (packed, scale)
        self.launches: dict = {}  # (rows, dtype) -> (GemvLaunch, scales address, scale bytes per expert) or None
        self.routed_launches: dict = {}  # (pairs, dtype, x_div) -> gpu.RoutedGemvLaunch or None

    def applies(self, rows: int, dtype: torch.dtype) -> bool:
        key = (rows, dtype)
        if key not in self.launches:
            self.launches[key] = self._prepare(rows, dtype)
        return self.launches[key] is not None

    def _prepare(self, rows: int, dtype: torch.dtype):
        if not self.gpu.gemv_applies(self.w.fmt, SCALE_NAME[dtype], rows):
            return None
        launch = self.gpu.GemvLaunch(self.first, SCALE_NAME[dtype], rows, overlap=pdl_ok(self.device))
        scales = self.stack.kernel_scales(launch.kernel.mode)
        return launch, scales.data.ptr, self.w.n * self.w.ngroups * scales.itemsize

    def routed(self, pairs: int, dtype: torch.dtype, x_div: int):
        """The routed GEMV of ``pairs`` pairs (x row p // x_div), prepared once; None where it does not apply."""
        key = (pairs, dtype, x_div)
        if key not in self.routed_launches:
            ok = self.gpu.gemv_applies(self.w.fmt, SCALE_NAME[dtype], 1) and pairs <= self.gpu.MAX_PAIRS
            self.routed_launches[key] = self.gpu.RoutedGemvLaunch(
                self.stack, self.stack.n // self.w.n, SCALE_NAME[dtype], pairs, x_div,
                overlap=pdl_ok(self.device)) if ok else None
        return self.routed_launches[key]

    def __call__(self, expert: int, rows: int, dtype: torch.dtype, x_ptr: int, y_ptr: int, stream: int) -> None:
        launch, scales, scale_step = self.launches[(rows, dtype)]
        launch.move_weight(self.payload + expert * self.payload_step, scales + expert * scale_step)
        call_gemv(launch, x_ptr, y_ptr, self.device, stream)


@torch.compiler.disable
def _untraced_forward(module: ExmyExperts, hidden_states, top_k_index, top_k_weights):
    return module._forward(hidden_states, top_k_index, top_k_weights)


@torch.library.custom_op("exmyconv::experts", mutates_args=())
def experts_op(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
               gate_up_packed: torch.Tensor, gate_up_scale: torch.Tensor, down_packed: torch.Tensor,
               down_scale: torch.Tensor, handle: int) -> torch.Tensor:
    """The forward of ``ExmyExperts`` number ``handle`` (its buffers are the tensor arguments, so the graph
    sees the dependency; the module supplies the formats, the activation and its prepared launches).
    Buffers that are not the module's own are computed from as given."""
    module = live_module(handle, "experts")
    given = [gate_up_packed, gate_up_scale, down_packed, down_scale]
    if any(a.data_ptr() != b.data_ptr() for a, b in zip(given, module._packed_buffers())):
        module = copy.copy(module)  # the same module over the given tensors (no launches of its own yet)
        module._buffers = dict(module._buffers)
        module._buffers.update(zip(PACKED_BUFFERS, given))
        module._reset_cuda()
    return module._forward(hidden_states, top_k_index, top_k_weights).contiguous()


@experts_op.register_fake
def _(hidden_states, top_k_index, top_k_weights, gate_up_packed, gate_up_scale, down_packed, down_scale, handle):
    return hidden_states.new_empty(hidden_states.shape)


def _segments(sorted_ids: list) -> list:
    """[(expert, start, end)] runs of equal values in a sorted list."""
    out, start = [], 0
    for i in range(1, len(sorted_ids) + 1):
        if i == len(sorted_ids) or sorted_ids[i] != sorted_ids[start]:
            out.append((sorted_ids[start], start, i))
            start = i
    return out
