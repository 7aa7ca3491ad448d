"""transformers quantizer "exmy": load exmy checkpoints (formats/SPEC.md) with ``from_pretrained``.

Import :mod:`exmyconv` (or :mod:`exmyconv.hf`) rather than this module: that registers lazily and
keeps ``import exmyconv`` fast. Importing this module imports torch and transformers and
registers at once.

How a checkpoint loads (docs/transformers.md has the user's view):

- The quantized tensors are the ``exmy:T`` records in the safetensors ``__metadata__`` of the
  checkpoint files; the quantizer reads the file headers (JSON only) before any weight is loaded.
- Before loading, every ``nn.Linear`` whose ``weight`` is a record, reached by the plain key
  (renamings and the base-model prefix aside), is replaced by an :class:`ExmyLinear` with the
  buffers ``weight_packed`` (uint8) and ``weight_scale`` (the stored fp16/bf16), so the
  checkpoint's ``T_packed`` / ``T_scale`` load into them unchanged.
- Every other record is dequantized while it loads, into the parameter the plain checkpoint
  would fill, in that parameter's dtype: quantized embeddings (``--quantize-embeddings``), a
  Linear whose weight is tied (a tied ``lm_head``), a Linear the model keeps in float32
  (``_keep_in_fp32_modules``, e.g. T5's ``wo`` in fp16), 3-D expert tensors that are parameters of an
  experts module, routers that are not ``nn.Linear``, and tensors that transformers' own
  conversion mapping transforms on load (e.g. per-expert ``experts.N.gate_proj.weight`` merged
  into a fused ``experts.gate_up_proj``: the dequantization runs before the merge).
- ``ExmyLinear.forward`` dequantizes the weight to the input's dtype and calls ``F.linear``
  (exactly what the plain model computes with the dequantized weight). On a CUDA input with
  ``exmyconv.gpu`` available, :meth:`ExmyLinear._gpu_forward` runs the fused kernels instead.

``model.dequantize()`` turns the ExmyLinear layers into nn.Linear (then the model saves as a
plain checkpoint). Limits: pre-quantized checkpoints only (no quantizing on load); no
save_pretrained of a quantized model; tensor parallelism and disk offload of quantized tensors
are not supported.
"""
from __future__ import annotations

import copy
import os
import re
import threading

import torch
import torch.nn.functional as F
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import Checkpoint
from .errors import ExmyError
from .formats import ExMy, get_format
from .layout import PACKED_SUFFIX, QUANT_METHOD, SCALE_SUFFIX, VERSION, TensorRecord, check_version
from .pack import padded_k, plane_shifts, row_bytes, shared_plane_bytes
from .quant import groups_of

__all__ = ["ExmyConfig", "ExmyHfQuantizer", "ExmyLinear", "dequantize", "unpack_codes", "register", "QUANT_METHOD"]

GEMV_MAX_BATCH = 16  # rows of x up to which the GPU path uses the fused GEMV (exmyconv.gpu.MAX_BATCH)
CHUNK_ELEMENTS = 1 << 20  # weights dequantized per step: bounds the float32 temporaries (~4 MB)
logger = logging.get_logger(__name__)
_TORCH_SCALE = {"F16": torch.float16, "BF16": torch.bfloat16}
_SCALE_NAME = {torch.float16: "F16", torch.bfloat16: "BF16"}


# ----------------------------------------------------------------------------- torch dequantizer

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


def dequantize(packed: torch.Tensor, scale: torch.Tensor, fmt: ExMy | str, k: int, group_size: int | None,
               dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed payload [..., row_bytes] + scales [..., ngroups] -> weights [..., k] of ``dtype``.

    Exactly formats/SPEC.md section 2: decode(code) * scale in float32 (exact), then rounded to
    ``dtype`` to nearest even; bit-identical to ``exmyconv.checkpoint.Checkpoint.dequantize``.
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


# ----------------------------------------------------------------------------- the module

_GPU = {"checked": False, "module": None}
_GPU_LOCK = threading.Lock()


def _gpu_backend():
    """exmyconv.gpu if it imports and says it can run here, else None (checked once per process)."""
    if not _GPU["checked"]:
        with _GPU_LOCK:
            if not _GPU["checked"]:
                module = None
                try:
                    from . import gpu as module  # noqa: PLC0415 - optional, owned by the GPU path
                    if not (callable(getattr(module, "available", None)) and module.available()):
                        module = None
                except Exception:  # ImportError, no CuPy, a broken CUDA setup: the torch path runs
                    module = None
                _GPU["module"], _GPU["checked"] = module, True
    return _GPU["module"]


class ExmyLinear(nn.Module):
    """A Linear layer whose weight stays packed ExMy (formats/SPEC.md) and is decoded per call.

    Buffers ``weight_packed`` (uint8 [out_features, row_bytes]) and ``weight_scale`` (the stored
    fp16/bf16 [out_features, ngroups]) hold exactly the checkpoint's ``<module>.weight_packed`` /
    ``<module>.weight_scale``; ``bias`` is an ordinary parameter. ``fmt``, ``group_size`` (G) and
    ``in_features`` (K) are the record's parameters.

    forward(x): on a CUDA input, :meth:`_gpu_forward` (fused kernels of ``exmyconv.gpu``) when it
    applies; otherwise the weight is dequantized to ``x.dtype`` and ``F.linear(x, W, bias)`` runs.
    Nothing is cached: the dequantized weight lives only during the call (memory stays at the
    packed size; a cache would cost the full-precision size). Set ``ExmyLinear.gpu_kernels =
    False`` (or environment ``EXMYCONV_GPU_KERNELS=0``) to use the dequantize + F.linear path on
    CUDA as well.

    ``weight`` is a read-only property for code that inspects ``module.weight`` (its dtype,
    device, shape — e.g. T5's feed-forward): each access dequantizes a fresh copy in
    ``weight_dtype`` (the dtype the model was loaded in; follows ``.to(dtype)``). Writing into
    it changes nothing.
    """

    gpu_kernels: bool = os.environ.get("EXMYCONV_GPU_KERNELS", "1") != "0"

    def __init__(self, in_features: int, out_features: int, fmt: ExMy | str, group_size: int | None = None,
                 bias: bool = True, scale_dtype: torch.dtype = torch.float16, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.weight_dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        self.group_size, ngroups = groups_of(self.in_features, group_size)
        if scale_dtype not in _SCALE_NAME:
            raise ExmyError(f"scales are float16 or bfloat16, not {scale_dtype}")
        self.scale_format = _SCALE_NAME[scale_dtype]  # "F16"/"BF16": what the checkpoint stores
        self.register_buffer("weight_packed", torch.empty(
            (self.out_features, row_bytes(self.fmt, self.in_features)), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty((self.out_features, ngroups), dtype=scale_dtype,
                                                         device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._gpu_weight_cache = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: ExMy | str, group_size: int | None,
                    scale_dtype: torch.dtype = torch.float16) -> "ExmyLinear":
        """An ExmyLinear for ``linear``'s shape and device, reusing its bias parameter (not its weight)."""
        new = cls(linear.in_features, linear.out_features, fmt, group_size, bias=False, scale_dtype=scale_dtype,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.bias = linear.bias  # the same Parameter object (or None): loads like the original's
        return new

    def extra_repr(self) -> str:
        g = "" if self.group_size == self.in_features else f", group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}{g}, "
                f"scales={self.scale_format}, bias={self.bias is not None}")

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out_features, in_features] as ``dtype`` (default ``weight_dtype``), a new tensor."""
        return dequantize(self.weight_packed, self.weight_scale, self.fmt, self.in_features, self.group_size,
                          dtype or self.weight_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized copy in ``weight_dtype`` (for code that inspects ``.weight``; costs a decode)."""
        return self.dequantize_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.gpu_kernels:
            y = self._gpu_forward(x)
            if y is not None:
                return y
        # CPU (and fallback) path: decode to the compute dtype, then the same F.linear as nn.Linear.
        return F.linear(x, self.dequantize_weight(x.dtype), self.bias)

    # -- GPU hook ----------------------------------------------------------------------------
    def _gpu_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The CUDA path, or None to fall back to dequantize + F.linear.

        Runs when ``exmyconv.gpu`` imports and ``exmyconv.gpu.available()``, x and the buffers are
        on CUDA, x is fp16/bf16, and the backend handles the format (``exmyconv.gpu.supports(fmt)``
        if it defines it, else unshared formats only). Then :meth:`_gpu_compute`.
        """
        gpu = _gpu_backend()
        if gpu is None or x.dtype not in (torch.float16, torch.bfloat16) or not self.weight_packed.is_cuda:
            return None
        supports = getattr(gpu, "supports", None)
        if not (supports(self.fmt) if callable(supports) else self.fmt.share == 1):
            return None
        return self._gpu_compute(gpu, x)

    def _gpu_compute(self, gpu, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T + b with the GPU backend ``gpu`` (exmyconv.gpu's API):

        - rows of x (leading dims flattened) <= ``gpu.MAX_BATCH`` (16): the fused GEMV
          ``gpu.gemv(x2d, weight)`` -> [rows, out_features] in x's dtype, then the bias is added;
        - more rows: ``weight.dequantize("F16"|"BF16")`` (bit-exact, a cupy array),
          ``gpu.to_torch(array, dtype)``, then ``F.linear`` — the same result as the plain model.

        ``weight`` is ``gpu.upload(payload=, scales=, scale_dtype=, fmt=, shape=, group_size=)`` of
        the buffers (see :meth:`_gpu_weight`).
        """
        x2 = x.reshape(-1, self.in_features)
        weight = self._gpu_weight(gpu)
        if x2.shape[0] <= getattr(gpu, "MAX_BATCH", GEMV_MAX_BATCH):
            y = gpu.gemv(x2.contiguous(), weight)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            out_dtype = "F16" if x.dtype == torch.float16 else "BF16"
            w = gpu.to_torch(weight.dequantize(out_dtype), out_dtype).reshape(self.out_features, self.in_features)
            y = F.linear(x2, w, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _gpu_weight(self, gpu):
        """``gpu.upload(...)`` of the buffers, kept while they stay where they are.

        The buffers are already on the GPU, so this is a zero-copy view (plus the small scale
        arrays the GEMV derives), not a dequantized copy.
        """
        key = (self.weight_packed.data_ptr(), self.weight_scale.data_ptr(), self.weight_scale.dtype)
        if self._gpu_weight_cache is None or self._gpu_weight_cache[0] != key:
            weight = gpu.upload(payload=self.weight_packed, scales=self.weight_scale, scale_dtype=self.scale_format,
                                fmt=self.fmt, shape=(self.out_features, self.in_features), group_size=self.group_size)
            self._gpu_weight_cache = (key, weight)
        return self._gpu_weight_cache[1]

    # -- dtype safety ------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the scales; ``.to(dtype)`` must not round them (bf16 -> fp16 is lossy).

        The scales pass through ``fn`` as integer bit patterns, which casts leave alone.
        """
        try:  # follow .to(dtype) / .half() with the dtype `weight` reports
            probe = fn(torch.empty(0, dtype=self.weight_dtype))
            if isinstance(probe, torch.Tensor) and probe.is_floating_point():
                self.weight_dtype = probe.dtype
        except Exception:
            pass
        scale = self._buffers.get("weight_scale")
        if scale is None or not scale.is_floating_point():
            return super()._apply(fn, recurse)
        dt = scale.dtype
        self._buffers["weight_scale"] = scale.view(torch.int16 if scale.element_size() == 2 else torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            moved = self._buffers["weight_scale"]
            if not moved.is_floating_point():
                self._buffers["weight_scale"] = moved.view(dt)
            self._gpu_weight_cache = None


# ----------------------------------------------------------------------------- checkpoint headers

def read_records(files) -> tuple[dict, dict, list]:
    """exmy records of safetensors files: ({T: TensorRecord}, {T: scale dtype "F16"/"BF16"}, all tensor names).

    The checkpoint reader validates headers, versions and each record's packed/scale tensors."""
    records, scale_dtypes, keys = {}, {}, []
    for path in files:
        with Checkpoint(str(path)) as ckpt:
            ckpt.check()
            keys.extend(ckpt.files[0].tensors)
            for name, (record, f) in ckpt.records.items():
                records[name] = record
                scale_dtypes[name] = f.tensors[record.scale_name].dtype
    return records, scale_dtypes, keys


# ----------------------------------------------------------------------------- transformers glue

class ExmyConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an exmy checkpoint (formats/SPEC.md section 4).

    ``format`` / ``group_size`` are the conversion defaults; each tensor's own parameters (the
    ``exmy:T`` records of the safetensors metadata) are authoritative. ``ignore`` lists the
    source tensors kept unquantized. Unknown keys are kept as attributes.
    """

    def __init__(self, format: str = "e2m2", group_size: int | None = None, ignore: list | None = None,
                 format_version: str = VERSION, exmyconv_version: str | None = None, **kwargs):
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format = format
        self.group_size = group_size
        self.ignore = list(ignore or [])
        self.format_version = str(format_version)
        self.exmyconv_version = exmyconv_version
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.post_init()

    def post_init(self):
        try:
            check_version(self.format_version, "quantization_config")
        except ExmyError as err:
            raise ValueError(str(err)) from None


def _suffixed(pattern: str, suffix: str) -> str:
    """A source pattern for ``<name>`` turned into one for ``<name><suffix>`` (before a final $)."""
    return pattern[:-1] + suffix + "$" if pattern.endswith("$") and not pattern.endswith(r"\$") else pattern + suffix


class _ExmyDequantize:
    """Conversion op: dequantize exmy tensors while they load (see ExmyHfQuantizer).

    ``record`` set: the converter collects exactly ``T_packed`` and ``T_scale`` of that record
    and the op returns the dequantized ``T`` under the key being loaded. Otherwise it runs first
    in a copy of one of the model's own converters: ``pairs`` maps each added
    ``<source>_packed`` / ``<source>_scale`` pattern to its ``<source>`` pattern; the op replaces
    them by dequantized tensors under ``<source>`` (merged, by checkpoint name, with any
    unquantized ones) for the converter's own operations.
    """

    supports_many_to_many = True  # a one-to-many converter (e.g. qkv -> q, k, v) gains sources

    def __init__(self, quantizer: "ExmyHfQuantizer", record: str | None = None, pairs: dict | None = None):
        self.hf_quantizer = quantizer  # transformers then skips its dtype cast for these tensors
        self.record = record
        self.pairs = pairs or {}

    def __deepcopy__(self, memo):  # the loader copies converters per layer; the op is stateless
        return self

    def __repr__(self):
        return f"ExmyDequantize({self.record or 'first'})"

    @property
    def reverse_op(self):
        raise NotImplementedError("exmy checkpoints are not saved back through transformers")

    @torch.no_grad()
    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                **kwargs):
        q = self.hf_quantizer
        dtype = q._target_dtype(full_layer_name, model)
        if self.record is not None:
            record = q._records[self.record]
            packed = _single(input_dict, PACKED_SUFFIX, self.record)
            scale = _single(input_dict, SCALE_SUFFIX, self.record)
            return {full_layer_name: q._dequantize_record(self.record, packed, scale, dtype)}
        out = {}
        for base in source_patterns:
            if base in self.pairs:
                continue
            packed_pat, scale_pat = _suffixed(base, PACKED_SUFFIX), _suffixed(base, SCALE_SUFFIX)
            named = []
            plain = input_dict.pop(base, [])
            plain = plain if isinstance(plain, list) else [plain]
            names = q._names.get((full_layer_name, base), [])
            if len(names) != len(plain):
                raise ExmyError(f"{full_layer_name}: {len(plain)} tensors for {base}, expected {len(names)}")
            named += [(n, t.to(dtype) if t.is_floating_point() else t) for n, t in zip(names, plain)]
            packed = input_dict.pop(packed_pat, [])
            scales = input_dict.pop(scale_pat, [])
            pnames = q._names.get((full_layer_name, packed_pat), [])
            snames = q._names.get((full_layer_name, scale_pat), [])
            tnames = [n[:-len(PACKED_SUFFIX)] for n in pnames]
            if len(packed) != len(pnames) or len(scales) != len(snames) or tnames != [
                    n[:-len(SCALE_SUFFIX)] for n in snames]:
                raise ExmyError(f"{full_layer_name}: packed and scale tensors of {base} do not pair up")
            named += [(t, q._dequantize_record(t, p, s, dtype)) for t, p, s in zip(tnames, packed, scales)]
            if named:
                named.sort(key=lambda item: _natural_key(item[0]))
                out[base] = [t for _, t in named]
        return out


def _single(input_dict, suffix, record):
    for key, value in input_dict.items():
        if key.endswith(suffix):
            return value[0] if isinstance(value, list) else value
    raise ExmyError(f"{record}: {record}{suffix} was not loaded")


def _natural_key(name):
    from transformers.core_model_loading import dot_natural_key

    return dot_natural_key(name)


class ExmyHfQuantizer(HfQuantizer):
    """Loads pre-quantized exmy checkpoints (quant_method "exmy"); see the module docstring."""

    requires_calibration = True  # only pre-quantized checkpoints: no quantization on load
    requires_parameters_quantization = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._records: dict[str, TensorRecord] = {}
        self._scale_dtypes: dict[str, str] = {}
        self._keys: list[str] = []
        self._linear: dict[str, str] = {}  # module path -> record replaced by an ExmyLinear
        self._dequant: dict[str, str] = {}  # record -> parameter it is dequantized into
        self._via_converter: set[str] = set()  # records consumed by one of the model's converters
        self._names: dict[tuple[str, str], list[str]] = {}  # (loaded key, source pattern) -> checkpoint names
        self._scale_buffers: set[str] = set()
        self._dtype = None
        self._dtype_plan: dict = {}
        self.serialized_names = {}

    # -- transformers hooks -------------------------------------------------------------------
    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError("exmy quantizes with `exmyconv quantize`; from_pretrained only loads converted checkpoints")

    def update_dtype(self, dtype):
        return dtype

    def is_serializable(self, **kwargs):
        return False

    @property
    def is_trainable(self):
        return False

    def preprocess_model(self, model, dtype=None, **kwargs):
        self._dtype = dtype if isinstance(dtype, torch.dtype) else None  # the base class keeps it to itself
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from transformers.conversion_mapping import get_model_conversion_mapping

        if not checkpoint_files:
            raise ValueError("exmy: loading needs the checkpoint's safetensors files (their metadata lists the "
                             "quantized tensors); a state_dict alone is not enough")
        files = [f for f in checkpoint_files if str(f).endswith(".safetensors")]
        self._records, self._scale_dtypes, self._keys = read_records(files)
        ignored = set(getattr(self.quantization_config, "ignore", None) or ())
        both = sorted(ignored & set(self._records))
        if both:
            raise ExmyError(f"damaged exmy checkpoint: {both[0]} is both quantized and in quantization_config.ignore")
        self._dtype_plan = model._get_dtype_plan(self._dtype) if self._dtype is not None else {}
        conversions = get_model_conversion_mapping(model, None, None)
        routes = self._routes(model, conversions)
        tied = set(model.all_tied_weights_keys) | set(model.all_tied_weights_keys.values())
        replaced = {}
        for name, record in self._records.items():
            target, converter = routes.get(name, (None, None))
            if target is None:
                # e.g. lm_head.weight when AutoModel loads a ...ForCausalLM checkpoint: the loader
                # reports its T_packed / T_scale as unexpected keys, as it would report T.
                logger.info(f"exmy: quantized tensor {name} matches nothing in {type(model).__name__}")
                continue
            if converter is not None:
                self._via_converter.add(name)
                continue
            path, _, leaf = target.rpartition(".")
            module = model.get_submodule(path) if path else model
            if (leaf == "weight" and isinstance(module, nn.Linear) and target not in tied and len(record.shape) == 2
                    and tuple(module.weight.shape) == record.shape and self._planned_dtype(target) is None):
                replaced[id(module)] = ExmyLinear.from_linear(module, record.fmt, record.group_size,
                                                              _TORCH_SCALE[self._scale_dtypes[name]])
                self._linear[path] = name
                self._scale_buffers.add(f"{path}.weight_scale")
            else:
                self._dequant[name] = target
        if replaced:
            _swap_modules(model, replaced)
        suffixes = {name.rpartition(".")[2] for name in self._via_converter}
        self.serialized_names = {s: [s, s + PACKED_SUFFIX, s + SCALE_SUFFIX] for s in sorted(suffixes)}
        return model

    def update_weight_conversions(self, weight_conversions, model):
        """Dequantize-on-load converters: one per record loaded into a non-ExmyLinear parameter, and
        a copy of each model converter that consumes records, with the dequantization run first."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_renamings

        if not self.pre_quantized:
            return list(weight_conversions)
        conversions = list(weight_conversions)
        routes = self._routes(model, conversions)
        by_id = {}
        for name in self._via_converter:
            converter = routes.get(name, (None, None))[1]
            if converter is not None:
                by_id[id(converter)] = converter
        updated = []
        for conv in conversions:
            if id(conv) in by_id:
                sources = list(conv.source_patterns)
                pairs = {}
                for s in sources:
                    pairs[_suffixed(s, PACKED_SUFFIX)] = s
                    pairs[_suffixed(s, SCALE_SUFFIX)] = s
                op = _ExmyDequantize(self, pairs=pairs)
                conv = conv.copy(sources + list(pairs), list(conv._original_target_patterns),
                                 operations=[op, *conv.operations])
            updated.append(conv)
        renamings = copy.deepcopy([c for c in conversions if isinstance(c, WeightRenaming)])
        own = []
        for name, target in sorted(self._dequant.items()):
            record = self._records[name]
            sources = ["^" + re.escape(apply_renamings(n, renamings)) for n in (record.packed_name, record.scale_name)]
            own.append(WeightConverter(sources, target, operations=[_ExmyDequantize(self, record=name)]))
        updated = own + updated
        self._names = self._collect_names(model, updated)
        return updated

    def get_new_dtype(self, converter, param, dtype):
        from transformers.core_model_loading import WeightRenaming

        if isinstance(converter, WeightRenaming) and converter.target_patterns[0] in self._scale_buffers:
            return None  # keep the stored fp16/bf16 scales (ExmyLinear's buffer has that dtype)
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        missing = [f"{path}.{buf}" for path in self._linear for buf in ("weight_packed", "weight_scale")
                   if not getattr(model.get_buffer(f"{path}.{buf}"), "_is_hf_initialized", False)]
        if missing:
            raise ExmyError(f"exmy: {len(missing)} quantized tensors did not load, e.g. {missing[0]}")
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every ExmyLinear becomes an nn.Linear holding its decoded weight.

        ``dtype`` (default: the dtype the model was loaded in, ``model.config.dtype``) is the
        weights' dtype; the values are exactly those of ``exmyconv.load_state_dict``.
        """
        replacements = {}
        for module in model.modules():
            if isinstance(module, ExmyLinear):
                target = dtype or module.weight_dtype
                with torch.device("meta"):
                    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                linear.weight = nn.Parameter(module.dequantize_weight(target), requires_grad=False)
                if module.bias is not None:
                    linear.bias = nn.Parameter(module.bias.detach().to(target), requires_grad=False)
                replacements[id(module)] = linear
        _swap_modules(model, replacements)
        return model

    # -- helpers -------------------------------------------------------------------------------
    def _routes(self, model, conversions) -> dict:
        """Where each record's tensor T goes: {T: (loaded key or None, model converter or None)}.

        Runs transformers' own key renaming over the checkpoint as if it were unquantized (T in
        place of T_packed / T_scale), in the loader's order, on copies of the transforms.
        """
        packed = {r.packed_name for r in self._records.values()} | {r.scale_name for r in self._records.values()}
        keys = [k for k in self._keys if k not in packed] + list(self._records)
        found = _simulate(model, conversions, keys)
        return {name: found[name] for name in self._records}

    def _collect_names(self, model, conversions) -> dict:
        """{(loaded key, source pattern): checkpoint names in load order} for the dequantize ops."""
        names: dict[tuple[str, str], list[str]] = {}
        for key, (target, converter, pattern) in _simulate(model, conversions, self._keys, patterns=True).items():
            if target is not None and converter is not None and any(
                    isinstance(op, _ExmyDequantize) and op.record is None for op in converter.operations):
                names.setdefault((target, pattern), []).append(key)
        return names

    def _planned_dtype(self, key):
        """The dtype transformers' dtype plan (``_keep_in_fp32_modules``) forces on ``key``, if any."""
        from transformers.core_model_loading import build_glob_alternation

        if not self._dtype_plan:
            return None
        alternation, by_group, _ = build_glob_alternation(list(self._dtype_plan))
        match = alternation.search(key)
        return None if match is None else self._dtype_plan[by_group[match.lastgroup]]

    def _target_dtype(self, key, model):
        planned = self._planned_dtype(key)
        if planned is not None:
            return planned
        try:
            return model.get_parameter_or_buffer(key).dtype
        except AttributeError:
            return self._dtype or torch.get_default_dtype()

    def _dequantize_record(self, name, packed, scale, dtype):
        record = self._records[name]
        if tuple(packed.shape) != record.packed_shape or tuple(scale.shape) != record.scale_shape:
            raise ExmyError(f"{name}: packed {list(packed.shape)} / scales {list(scale.shape)} do not match "
                            f"its exmy record ({list(record.packed_shape)} / {list(record.scale_shape)})")
        return dequantize(packed, scale, record.fmt, record.k, record.group_size, dtype)


def _simulate(model, conversions, keys, patterns: bool = False) -> dict:
    """The loader's key routing (transformers.core_model_loading.convert_and_load_state_dict_in_model).

    {checkpoint key: (loaded key or None, converter or None[, matched source pattern])}, computed on
    copies of the transforms (renaming marks them used and some keep state).
    """
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    copies = copy.deepcopy(list(conversions))
    renamings = [c for c in copies if isinstance(c, WeightRenaming)]
    converters = [c for c in copies if isinstance(c, WeightConverter)]
    originals = {id(cp): orig for cp, orig in zip(copies, conversions)}
    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    prefix = model.base_model_prefix
    out = {}
    for key in sorted(keys, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        converter = originals[id(pattern_to_converter[pattern])] if pattern is not None else None
        target = renamed if renamed in meta else None
        out[key] = (target, converter, pattern) if patterns else (target, converter)
    return out


def _swap_modules(model, replacements: dict) -> None:
    """Put replacements[id(old)] wherever ``old`` is a child (all parents, shared modules too)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]


# ----------------------------------------------------------------------------- registration

_REGISTER_LOCK = threading.Lock()


def check_transformers() -> None:
    """Raise ExmyError unless this transformers has the loading API the quantizer relies on (5.x)."""
    import importlib.util

    import transformers

    needed = ("update_weight_conversions", "get_new_dtype", "get_load_operations")
    if (importlib.util.find_spec("transformers.core_model_loading") is None
            or not all(hasattr(HfQuantizer, name) for name in needed)):
        raise ExmyError(f"exmyconv's transformers integration needs transformers 5 (tested with 5.23), "
                        f"found {transformers.__version__}")


def register() -> None:
    """Register ExmyConfig / ExmyHfQuantizer under "exmy" (public transformers API; idempotent)."""
    check_transformers()
    with _REGISTER_LOCK:
        for decorate, cls in ((register_quantization_config, ExmyConfig), (register_quantizer, ExmyHfQuantizer)):
            try:
                decorate(QUANT_METHOD)(cls)
            except ValueError:  # already registered (by an earlier import of this module)
                pass


register()
