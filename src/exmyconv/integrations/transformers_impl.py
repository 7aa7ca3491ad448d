"""transformers quantizer "exmy": load exmy checkpoints (formats/SPEC.md) with ``from_pretrained``.

Import :mod:`exmyconv` (or :mod:`exmyconv.integrations.transformers`) rather than this module: that registers lazily and
keeps ``import exmyconv`` fast. Importing this module imports torch and transformers and
registers at once.

How a checkpoint loads (docs/transformers.md has the user's view):

- The quantized tensors are the ``exmy:T`` records in the safetensors ``__metadata__`` of the
  checkpoint files; the quantizer reads the file headers (JSON only) before any weight is loaded.
- Before loading, every ``nn.Linear`` whose ``weight`` is a record, reached by the plain key
  (renamings and the base-model prefix aside), is replaced by an :class:`ExmyLinear` with the
  buffers ``weight_packed`` (uint8) and ``weight_scale`` (the stored fp16/bf16), so the
  checkpoint's ``T_packed`` / ``T_scale`` load into them unchanged.
- Every MoE experts module (3-D ``gate_up_proj`` / ``down_proj``, the layout of :func:`_experts_layout`)
  whose expert records stack exactly is replaced by an :class:`ExmyExperts` with buffers
  ``gate_up_proj_packed`` / ``_scale`` and ``down_proj_packed`` / ``_scale``: a 3-D record loads into
  them unchanged; per-expert 2-D records (``experts.N.gate_proj.weight`` ...) that one of the
  model's converters merges load through copies of that converter whose only op,
  :class:`_StackExperts`, stacks the packed payloads (and the scales) as the converter stacks the
  weights (:meth:`ExmyHfQuantizer._pack_experts` says when a module falls back to dequantizing).
- Every other record is dequantized while it loads, into the parameter the plain checkpoint
  would fill, in that parameter's dtype: quantized embeddings (``--quantize-embeddings``), a
  Linear whose weight is tied (a tied ``lm_head``), a Linear the model keeps in float32
  (``_keep_in_fp32_modules``, e.g. T5's ``wo`` in fp16), 3-D expert tensors of other layouts
  (e.g. GPT-OSS: transposed, with biases), routers that are not ``nn.Linear``, and tensors that
  transformers' own conversion mapping transforms on load (e.g. per-expert
  ``experts.N.gate_proj.weight`` of experts that do not stack, merged into a fused
  ``experts.gate_up_proj``: the dequantization runs before the merge).
- ``ExmyLinear.forward`` dequantizes the weight to the input's dtype and calls ``F.linear``
  (exactly what the plain model computes with the dequantized weight). On a CUDA input with
  ``exmyconv.cuda.gpu`` available, :meth:`ExmyLinear._gpu_forward` runs the fused kernels instead.

``model.dequantize()`` turns the ExmyLinear layers into nn.Linear (then the model saves as a
plain checkpoint). Limits: pre-quantized checkpoints only (no quantizing on load); no
save_pretrained of a quantized model; tensor parallelism and disk offload of quantized tensors
are not supported.

transformers versions (``SUPPORTED_TRANSFORMERS`` in :mod:`exmyconv.integrations.transformers`,
>=5.16.1,<6; :func:`check_transformers` refuses others). What the quantizer relies on:

- every version: the registry (``register_quantization_config`` / ``register_quantizer``), the
  HfQuantizer hooks ``_process_model_before_weight_loading`` / ``update_weight_conversions`` /
  ``_process_model_after_weight_loading`` / ``_dequantize``, and the loader of
  ``transformers.core_model_loading``: WeightConverter / WeightRenaming (source patterns, their
  ``rename_source_key``), the op protocol ``convert(input_dict, source_patterns, ...)``, the
  function ``rename_source_key`` (``_simulate`` replays the loader's routing with it),
  ``dot_natural_key``, ``build_glob_alternation``; ``get_model_conversion_mapping``;
  ``PreTrainedModel._get_dtype_plan`` and ``all_tied_weights_keys``.
- 5.16-5.20 differ in four ways, each met where it matters: ``update_weight_conversions`` gets no
  model (the quantizer keeps a weak reference from ``_process_model_before_weight_loading``);
  converters have no ``copy`` (:func:`_copy_converter` builds the same WeightConverter); there is
  no ``get_new_dtype`` hook (the loader itself keeps the checkpoint dtype of renamed and integer
  tensors and gives the scales their buffer's dtype, the stored one); a source pattern matches
  anywhere in a key, the first listed first (the ``_packed`` / ``_scale`` patterns are listed
  first).
- before 5.23 a converter with several sources and several targets is refused unless its ops are
  transformers' own: a quantized tensor that transformers splits on load (HRM's fused
  ``gate_up_proj``) raises ExmyError there (:func:`_copy_converter`); 5.23 added
  ``ConversionOps.supports_many_to_many``.
"""
from __future__ import annotations

import copy
import re
import threading
import weakref
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import ExmyError
from ..format.layout import GUARD_VALUE, PACKED_SUFFIX, QUANT_METHOD, SCALE_SUFFIX, VERSION, TensorRecord
from ..format.quant import groups_of
from ..io.checkpoint import open_checkpoint
from ..io.validate import check_quantization_config
from ..torch.codec import TORCH_DTYPE, dequantize, scale_values, unpack_codes  # noqa: F401 (integrations.transformers exports them)
from ..torch.embedding import ExmyEmbedding
from ..torch.experts import PROJECTIONS, ExmyExperts, ExpertWeights
from ..torch.linear import ExmyLinear
from ..torch.siblings import fuse_siblings

__all__ = ["ExmyConfig", "ExmyHfQuantizer", "ExmyLinear", "dequantize", "unpack_codes", "register", "QUANT_METHOD"]

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------- checkpoint headers

def read_records(files) -> tuple[dict, dict, list]:
    """exmy records of a checkpoint's safetensors files: ({T: TensorRecord}, {T: scale dtype "F16"/"BF16"},
    all tensor names of ``files``).

    The folder that holds ``files`` is opened with :func:`exmyconv.io.checkpoint.open_checkpoint`, the
    validation every reader shares (headers, versions, records, scales, index, config.json); a damaged
    checkpoint raises the same one-line ExmyError as ``exmyconv inspect`` / ``load_state_dict``."""
    paths = [Path(f) for f in files]
    if not paths:
        raise ExmyError("no .safetensors files")
    folders = sorted({p.parent for p in paths})
    records, scale_dtypes, keys = {}, {}, []
    for where in folders if len(folders) == 1 else paths:  # (several folders: each file on its own)
        with open_checkpoint(str(where)) as ckpt:
            wanted = {p.name for p in paths}
            for f in ckpt.files:
                if f.path.name in wanted:
                    keys.extend(f.tensors)
            for name, (record, f) in ckpt.records.items():
                if f.path.name in wanted:
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
        self.ignore = ignore if ignore is not None else []
        self.format_version = format_version
        self.exmyconv_version = exmyconv_version
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.post_init()

    def post_init(self):
        """The checks every reader applies to a quantization_config (exmyconv.io.validate); ValueError."""
        problems = check_quantization_config(self.__dict__)
        if problems:
            raise ValueError(problems[0])


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


class _StackExperts:
    """Conversion op: per-expert packed payloads (or scales) stacked into an ExmyExperts buffer.

    Runs alone in a copy of a model converter that merges per-expert tensors (see
    ExmyHfQuantizer._expert_weights), with the sources and targets suffixed ``_packed`` (or
    ``_scale``): each source's tensors, in expert order, are stacked along a new first dim, and the
    sources are concatenated along rows, as the model's converter does with the unquantized weights.
    Rows are packed independently, so the result is exactly the packed 3-D tensor."""

    def __init__(self, quantizer: "ExmyHfQuantizer"):
        self.hf_quantizer = quantizer  # transformers then keeps the checkpoint dtype (stored scales)

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return "ExmyStackExperts"

    @property
    def reverse_op(self):
        raise NotImplementedError("exmy checkpoints are not saved back through transformers")

    @torch.no_grad()
    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                **kwargs):
        parts = []
        for pattern in source_patterns:
            tensors = input_dict.pop(pattern, [])
            tensors = tensors if isinstance(tensors, list) else [tensors]
            names = self.hf_quantizer._names.get((full_layer_name, pattern), [])
            if not tensors or len(names) != len(tensors):
                raise ExmyError(f"{full_layer_name}: {len(tensors)} tensors for {pattern}, expected {len(names)}")
            order = sorted(range(len(names)), key=lambda i: _natural_key(names[i]))
            parts.append(torch.stack([tensors[i] for i in order]))
        stacked = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if model is not None:
            expected = model.get_buffer(full_layer_name)
            if stacked.shape != expected.shape:
                raise ExmyError(f"{full_layer_name}: stacked experts {list(stacked.shape)}, expected "
                                f"{list(expected.shape)}")
        return {full_layer_name: stacked}


def _stacks_experts(converter) -> bool:
    """Whether a model converter only stacks per-expert tensors (transformers' MergeModulelist along
    dim 0) and, with several sources, concatenates them along rows (Concatenate along dim 1)."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    expected = [("MergeModulelist", 0)] + ([("Concatenate", 1)] if len(converter.source_patterns) > 1 else [])
    return ops == expected and len(converter._original_target_patterns) == 1


def _experts_layout(module) -> bool | None:
    """True when ``module`` is a transformers experts module ExmyExperts computes exactly: 3-D
    ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], no biases, gate and up concatenated
    (not interleaved, not transposed), transformers' default gating ``act_fn(gate) * up``."""
    from transformers.integrations import moe

    params = module._parameters
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if set(params) != {"gate_up_proj", "down_proj"} or module._buffers or gate_up.dim() != 3 or down.dim() != 3:
        return None
    if not hasattr(module, "is_transposed") or module.is_transposed or not getattr(module, "is_concatenated", True) \
            or not getattr(module, "has_gate", True) or getattr(module, "has_bias", False) \
            or getattr(module, "has_post_expert_norm", False) or not hasattr(module, "act_fn"):
        return None  # (hasattr is_transposed: the class is marked by transformers' use_experts_implementation)
    if getattr(type(module), "_apply_gate", None) is not getattr(moe, "_default_apply_gate", None):
        return None
    e, n, h = gate_up.shape
    return True if down.shape == (e, h, n // 2) and n % 2 == 0 else None


def _single(input_dict, suffix, record):
    for key, value in input_dict.items():
        if key.endswith(suffix):
            return value[0] if isinstance(value, list) else value
    raise ExmyError(f"{record}: {record}{suffix} was not loaded")


def _natural_key(name):
    from transformers.core_model_loading import dot_natural_key

    return dot_natural_key(name)


def _renamed(key, renamings):
    """``key`` after every renaming in turn, as the loader renames it (all versions)."""
    for renaming in renamings:
        key = renaming.rename_source_key(key)[0]
    return key


def _copy_converter(conv, sources, first_ops, replace: bool = False, targets=None):
    """A model converter with other source patterns and ``first_ops`` before its own operations
    (``replace``: instead of them), optionally with other ``targets``."""
    from transformers.core_model_loading import WeightConverter

    targets = list(targets or conv._original_target_patterns)
    operations = list(first_ops) if replace else [*first_ops, *conv.operations]
    try:
        if hasattr(conv, "copy"):  # transformers >= 5.21
            return conv.copy(sources, targets, operations=operations)
        # transformers <= 5.20: what copy() does in 5.21
        new = WeightConverter(sources, targets, operations=operations, force_cpu=conv.force_cpu)
        new.scope_prefix, new.base_model_prefix = conv.scope_prefix, conv.base_model_prefix
        return new
    except ValueError as err:
        if len(targets) == 1:
            raise
        # transformers <= 5.22 takes many sources for many targets only with its own operations
        # (ConversionOps.supports_many_to_many came in 5.23): a split tensor gains sources here
        import transformers

        raise ExmyError(f"exmy: transformers {transformers.__version__} cannot load quantized tensors that it splits "
                        f"on load ({conv.source_patterns[0]} into {targets}); use transformers >= 5.23 ({err})") from None


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
        self._embeddings: dict[str, str] = {}  # module path -> record replaced by an ExmyEmbedding
        self._dequant: dict[str, str] = {}  # record -> parameter it is dequantized into
        self._via_converter: set[str] = set()  # records consumed by one of the model's converters
        self._stacked: set[str] = set()  # per-expert records stacked into an ExmyExperts by a converter copy
        self._experts: list[str] = []  # module paths of the ExmyExperts
        self._names: dict[tuple[str, str], list[str]] = {}  # (loaded key, source pattern) -> checkpoint names
        self._scale_buffers: set[str] = set()
        self._dtype = None
        self._dtype_plan: dict = {}
        self._model = lambda: None  # weak reference to the model being loaded (update_weight_conversions)
        self.serialized_names = {}

    # -- transformers hooks -------------------------------------------------------------------
    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError("exmy quantizes with `exmyconv quantize`; from_pretrained only loads converted checkpoints")

    def update_dtype(self, dtype):
        return dtype

    def update_tp_plan(self, config):
        """Every supported transformers calls this with the config before the model is built (5.16-5.22
        have no update_attn_implementation hook), so the guard is taken out here as well."""
        return super().update_tp_plan(self.update_attn_implementation(config))

    def update_attn_implementation(self, config):
        """Undo the guard that a converted config.json carries (formats/SPEC.md section 4): its
        ``attn_implementation`` makes transformers refuse the checkpoint unless this quantizer runs
        (without exmyconv it would otherwise build the model with random weights and only warn)."""
        if getattr(config, "_attn_implementation", None) == GUARD_VALUE:
            config._attn_implementation = None  # the model's default, as for the source checkpoint
        return config

    def is_serializable(self, **kwargs):
        return False

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self) -> bool:
        """ExmyLinear is one custom op under torch.compile (torch/linear.py), so generate() with a
        static cache compiles the decode step as it does for the source model."""
        return True

    def preprocess_model(self, model, dtype=None, **kwargs):
        self._dtype = dtype if isinstance(dtype, torch.dtype) else None  # the base class keeps it to itself
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from transformers.conversion_mapping import get_model_conversion_mapping

        if not checkpoint_files:
            raise ValueError("exmy: loading needs the checkpoint's safetensors files (their metadata lists the "
                             "quantized tensors); a state_dict alone is not enough")
        self._model = weakref.ref(model)
        files = [f for f in checkpoint_files if str(f).endswith(".safetensors")]
        self._records, self._scale_dtypes, self._keys = read_records(files)
        self._dtype_plan = model._get_dtype_plan(self._dtype) if self._dtype is not None else {}
        conversions = get_model_conversion_mapping(model, None, None)
        routes = self._routes(model, conversions)
        tied = set(model.all_tied_weights_keys) | set(model.all_tied_weights_keys.values())
        replaced = {}
        experts = {}  # experts module path -> {projection: [(record, model converter or None)]}
        for name, record in self._records.items():
            target, converter = routes.get(name, (None, None))
            if target is None:
                # e.g. lm_head.weight when AutoModel loads a ...ForCausalLM checkpoint: the loader
                # reports its T_packed / T_scale as unexpected keys, as it would report T.
                logger.info(f"exmy: quantized tensor {name} matches nothing in {type(model).__name__}")
                continue
            path, _, leaf = target.rpartition(".")
            module = model.get_submodule(path) if path else model
            if leaf in PROJECTIONS and _experts_layout(module) is not None:
                experts.setdefault(path, {}).setdefault(leaf, []).append((name, converter))
                continue
            if converter is not None:
                self._via_converter.add(name)
                continue
            packable = (leaf == "weight" and target not in tied and len(record.shape) == 2
                        and record.current_bytes  # (a 1.x payload that needs re-padding is dequantized instead)
                        and tuple(module.weight.shape) == record.shape and self._planned_dtype(target) is None)
            scale_dtype = torch.float8_e4m3fn if record.scale_exp is not None else TORCH_DTYPE.get(
                self._scale_dtypes[name])
            if packable and isinstance(module, nn.Linear):
                replaced[id(module)] = ExmyLinear.from_linear(module, record.fmt, record.group_size, scale_dtype,
                                                              record.scale_exp)
                self._linear[path] = name
                self._scale_buffers.add(f"{path}.weight_scale")
            elif packable and type(module) is nn.Embedding and module.max_norm is None and not module.sparse:
                # (exactly nn.Embedding: subclasses such as scaled embeddings compute more than a lookup)
                replaced[id(module)] = ExmyEmbedding.from_embedding(module, record.fmt, record.group_size, scale_dtype,
                                                                    record.scale_exp)
                self._embeddings[path] = name
                self._scale_buffers.add(f"{path}.weight_scale")
            else:
                self._dequant[name] = target
        self._pack_experts(model, experts, routes, replaced)
        if replaced:
            _swap_modules(model, replaced)
        suffixes = {name.rpartition(".")[2] for name in self._via_converter}
        self.serialized_names = {s: [s, s + PACKED_SUFFIX, s + SCALE_SUFFIX] for s in sorted(suffixes)}
        return model

    def update_weight_conversions(self, weight_conversions, model=None):
        """Dequantize-on-load converters: one per record loaded into a non-ExmyLinear parameter, and
        a copy of each model converter that consumes records, with the dequantization run first."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        if not self.pre_quantized:
            return list(weight_conversions)
        if model is None:  # transformers <= 5.20 passes no model: the one prepared for loading
            model = self._model()
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
                # suffixed patterns first: transformers <= 5.20 takes the first pattern that matches
                # anywhere in a key, and `gate_proj.weight` matches `gate_proj.weight_packed` there
                conv = _copy_converter(conv, list(pairs) + sources, [_ExmyDequantize(self, pairs=pairs)])
            updated.append(conv)
        renamings = copy.deepcopy([c for c in conversions if isinstance(c, WeightRenaming)])
        own = []
        for name, target in sorted(self._dequant.items()):
            record = self._records[name]
            sources = ["^" + re.escape(_renamed(n, renamings)) for n in (record.packed_name, record.scale_name)]
            own.append(WeightConverter(sources, target, operations=[_ExmyDequantize(self, record=name)]))
        stacking = {}
        for name in self._stacked:
            converter = routes.get(name, (None, None))[1]
            if converter is not None:
                stacking[id(converter)] = converter
        for conv in stacking.values():  # one copy for the payloads, one for the scales
            for suffix in (PACKED_SUFFIX, SCALE_SUFFIX):
                own.append(_copy_converter(conv, [_suffixed(s, suffix) for s in conv.source_patterns],
                                           [_StackExperts(self)], replace=True,
                                           targets=[_suffixed(t, suffix) for t in conv._original_target_patterns]))
        updated = own + updated
        self._names = self._collect_names(model, updated)
        return updated

    def get_new_dtype(self, converter, param, dtype):
        from transformers.core_model_loading import WeightRenaming

        if isinstance(converter, WeightRenaming) and converter.target_patterns[0] in self._scale_buffers:
            return None  # keep the stored fp16/bf16 scales (ExmyLinear's buffer has that dtype)
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        buffers = [f"{path}.{buf}" for path in [*self._linear, *self._embeddings]
                   for buf in ("weight_packed", "weight_scale")]
        buffers += [f"{path}.{leaf}{suffix}" for path in self._experts for leaf in PROJECTIONS
                    for suffix in (PACKED_SUFFIX, SCALE_SUFFIX)]
        missing = [b for b in buffers if not getattr(model.get_buffer(b), "_is_hf_initialized", False)]
        if missing:
            raise ExmyError(f"exmy: {len(missing)} quantized tensors did not load, e.g. {missing[0]}")
        for path in [*self._linear, *self._experts]:  # on the GPU: the layout the kernels read, before anything compiles
            model.get_submodule(path).align_rows()
        fuse_siblings(model)  # q/k/v and gate/up as one GEMV each on CUDA (torch.siblings)
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every ExmyLinear becomes an nn.Linear, every ExmyEmbedding an nn.Embedding,
        holding its decoded weight, and every ExmyExperts the experts module it replaced.

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
            elif isinstance(module, ExmyEmbedding):
                with torch.device("meta"):
                    embedding = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx)
                embedding.weight = nn.Parameter(module.dequantize_weight(dtype or module.weight_dtype),
                                                requires_grad=False)
                replacements[id(module)] = embedding
            elif isinstance(module, ExmyExperts):
                plain = module._source_module[0]
                for leaf in PROJECTIONS:
                    weight = module.dequantize_weight(leaf, None, dtype or module.weight_dtype)
                    setattr(plain, leaf, nn.Parameter(weight, requires_grad=False))
                replacements[id(module)] = plain
        _swap_modules(model, replacements)
        return model

    # -- packed experts --------------------------------------------------------------------------
    def _pack_experts(self, model, experts: dict, routes: dict, replaced: dict) -> None:
        """An ExmyExperts for each experts module whose expert tensors are all records that stack
        into its buffers (see :func:`_expert_weights`); the records of the others are dequantized.

        A model converter (e.g. ``experts.*.gate_proj.weight`` + ``experts.*.up_proj.weight`` ->
        ``experts.gate_up_proj``) serves every layer through one source pattern, so it is copied into
        stacking converters only if every module it feeds is packed: one layer that must dequantize
        (its gate and up records differ in format under ``--format auto``, say) makes every module of
        that converter dequantize."""
        plans = {}
        for path, by_leaf in experts.items():
            module = model.get_submodule(path)
            plan = {leaf: self._expert_weights(module, leaf, by_leaf.get(leaf, [])) for leaf in PROJECTIONS}
            if all(p is not None for p in plan.values()):
                plans[path] = plan
        feeds: dict[int, set] = {}  # id(model converter) -> paths of the modules it loads into
        for target, converter in routes.values():
            if target is not None and converter is not None:
                feeds.setdefault(id(converter), set()).add(target.rpartition(".")[0])
        changed = True
        while changed:
            changed = False
            for paths in feeds.values():
                if not paths <= plans.keys() and paths & plans.keys():
                    for path in paths & plans.keys():
                        del plans[path]
                    changed = True
        for path, by_leaf in experts.items():
            for leaf, items in by_leaf.items():
                for name, converter in items:
                    if path not in plans:
                        if converter is None:
                            self._dequant[name] = f"{path}.{leaf}"
                        else:
                            self._via_converter.add(name)
                    elif converter is not None:
                        self._stacked.add(name)
        for path, plan in plans.items():
            module = model.get_submodule(path)
            new = ExmyExperts(module.gate_up_proj.shape[0], plan["gate_up_proj"], plan["down_proj"], module.act_fn,
                              device=module.gate_up_proj.device, dtype=module.gate_up_proj.dtype)
            new._source_module = (module,)  # (a tuple: not a submodule) what model.dequantize() puts back
            replaced[id(module)] = new
            self._experts.append(path)
            self._scale_buffers.update(f"{path}.{leaf}_scale" for leaf in PROJECTIONS)

    def _expert_weights(self, module, leaf: str, items: list) -> ExpertWeights | None:
        """The layout of ``module``'s parameter ``leaf`` [E, N, K] as ExmyExperts holds it packed, or None
        where its records do not stack exactly: either one 3-D record of that shape, or E per-expert
        2-D records per source of one model converter that stacks them (transformers' MergeModulelist
        along experts, then Concatenate along rows, e.g. gate and up) — all of one format, group size,
        scale dtype and 8-bit scale_exp (rows are packed independently, so stacking packed rows is exact;
        ``exmyconv quantize`` makes the experts of a stack agree: format.fused.expert_stack)."""
        if not items:
            return None
        e, n, k = getattr(module, leaf).shape
        names = [name for name, _ in items]
        records = [self._records[name] for name in names]
        converters = {id(c) for _, c in items}
        first = records[0]
        if len(converters) != 1 or any(
                not r.current_bytes or r.fmt != first.fmt or groups_of(k, r.group_size) != groups_of(k, first.group_size)
                or self._scale_dtypes[name] != self._scale_dtypes[names[0]] or r.scale_exp != first.scale_exp
                for name, r in zip(names, records)):
            return None
        converter = items[0][1]
        if converter is None:
            if len(records) != 1 or tuple(first.shape) != (e, n, k):
                return None
        else:
            sources = len(converter.source_patterns)
            if (not _stacks_experts(converter) or n % sources or len(records) != e * sources
                    or any(tuple(r.shape) != (n // sources, k) for r in records)):
                return None
        scale_dtype = torch.float8_e4m3fn if first.scale_exp is not None else TORCH_DTYPE[self._scale_dtypes[names[0]]]
        return ExpertWeights(first.fmt, k, n, first.group_size, scale_dtype, first.scale_exp)

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
                    isinstance(op, _StackExperts) or isinstance(op, _ExmyDequantize) and op.record is None
                    for op in converter.operations):
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
        return dequantize(record.payload(packed), scale_values(scale, record.scale_exp), record.fmt, record.k,
                          record.group_size, dtype)


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
    """Raise ExmyError unless this transformers is in the supported range and has the loading API
    the quantizer relies on (the module docstring says which, per version)."""
    import importlib.util

    import transformers

    from .transformers import SUPPORTED_TRANSFORMERS, unsupported

    problem = unsupported(transformers.__version__)
    if problem is None and (importlib.util.find_spec("transformers.core_model_loading") is None
                            or not hasattr(HfQuantizer, "update_weight_conversions")):
        problem = (f"transformers {transformers.__version__} lacks the weight-loading API exmyconv relies on in the "
                   f"range it supports ({SUPPORTED_TRANSFORMERS}): transformers.core_model_loading, "
                   f"HfQuantizer.update_weight_conversions")
    if problem is not None:
        raise ExmyError(problem)


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
