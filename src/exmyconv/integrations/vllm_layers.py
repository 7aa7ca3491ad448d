"""The layer methods of vLLM's quantization method "exmy" (see :mod:`exmyconv.integrations.vllm_impl`).

- Linear layers whose weight (all shards of a fused layer: q/k/v into ``qkv_proj``, gate/up into
  ``gate_up_proj``) is quantized in one format and group size: :class:`ExmyLinearMethod`. The weight
  stays packed: parameters ``weight_packed`` (uint8 [rows, row_bytes]) and ``weight_scale`` (the stored
  fp16/bf16 [rows, groups]; 8-bit scales, and fused shards stored with different scale dtypes, load as
  their float32 values, exact for all, and are narrowed after loading to the 16-bit dtype that holds
  them all where one does: always for 8-bit scales), rows concatenated along the output dimension by
  vLLM's own loaders of the
  layer (so column parallelism, fused shards and replicated KV heads work as for any weight).
  Row-parallel layers (o_proj, down_proj) under tensor parallelism split K: each rank's slice is
  unpacked, cut and packed again at load (its rows padded anew); the split must fall
  on scale-group boundaries. Compute: :class:`exmyconv.torch.packed.PackedLinear` (one torch op).
- An untied ``lm_head`` and the input table of a model whose ``lm_head`` is untied
  (``--quantize-embeddings``): :class:`ExmyPackedEmbeddingMethod`, packed like a linear layer; a lookup
  decodes only its rows.
- Fused-MoE layers whose experts' gate/up stack and down stack are each in one format, group size and
  scale kind (what ``exmyconv quantize`` writes): :class:`ExmyPackedMoEMethod`, the experts packed,
  computed by :class:`exmyconv.torch.experts.ExmyExperts` (one torch op) on vLLM's routing.
- Everything else that is quantized is decoded at load into the full-precision parameter vLLM's
  unquantized method would hold (:class:`_DequantOnLoad`), so it runs vLLM's own kernels at that
  memory cost: fused-MoE experts that cannot stay packed (:class:`ExmyMoEMethod`), input embeddings tied to
  the ``lm_head`` (``--quantize-embeddings``), MoE routers (tiny, and vLLM has special kernels for them), and any
  linear layer the packed method cannot hold (fused shards in different formats, a mix of quantized
  and plain shards, a tensor-parallel split that cuts scale groups), each named in one warning.
- Quantized tensors of modules vLLM builds without the quantization config (Mixtral's router, for
  instance: "gate always runs at half / full precision") never reach a method: they are decoded in the
  weight stream (:class:`DecodingMapper`, the config's ``get_checkpoint_weight_mapper``), so the plain
  parameter loads them as if the checkpoint held them unquantized.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch.nn import Parameter
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase, QKVParallelLinear, RowParallelLinear,
                                               UnquantizedLinearMethod)
from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead, UnquantizedEmbeddingMethod,
                                                                 VocabParallelEmbedding)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.utils import set_weight_attrs

from ..errors import ExmyError
from ..format.exmy import ExMy
from ..format.pack import row_bytes
from ..format.quant import groups_of
from ..format.layout import PACKED_SUFFIX, SCALE_SUFFIX
from ..torch.codec import TORCH_DTYPE, dequantize, dequantize_rows, narrowed_scales, scale_values
from ..torch.experts import ExmyExperts, ExpertWeights
from ..torch.linear import kernel_rows
from ..torch.packed import PackedLinear, slice_k

logger = init_logger("vllm.exmyconv")
_WARNED: set = set()
_ELSEWHERE = object()  # a loader key: the tensor belongs to another rank


def _warn_once(text: str) -> None:
    if text not in _WARNED:
        _WARNED.add(text)
        logger.warning(text)


def quant_method(config, layer: torch.nn.Module, prefix: str):
    """The method for ``layer`` (vLLM's ``QuantizationConfig.get_quant_method``). The records it hands to
    a method are added to ``config.claimed`` (what the weight stream must leave packed)."""
    method, names = _method(config, layer, prefix)
    config.claimed.update(names)
    return method


def _method(config, layer, prefix: str):
    tensors = config.tensors
    if isinstance(layer, LinearBase):
        shards, names = _linear_shards(config, layer, prefix)
        if not any(shards.values()):
            return UnquantizedLinearMethod(), ()
        if isinstance(layer, GateLinear):
            return ExmyDequantLinearMethod(prefix, shards), names
        reason = _cannot_pack(layer, shards)
        if reason is None:
            return ExmyLinearMethod(prefix, shards), names
        _warn_once(f"exmyconv: {prefix} is decoded to full precision at load ({reason})")
        return ExmyDequantLinearMethod(prefix, shards), names
    if isinstance(layer, RoutedExperts):
        experts, names = _expert_records(tensors, layer, prefix)
        if not experts:
            return None, ()
        stacks = _expert_stacks(layer, experts)
        if isinstance(stacks, dict):
            return ExmyPackedMoEMethod(layer.moe_config, prefix, experts, stacks), names
        _warn_once(f"exmyconv: {prefix} experts are decoded to full precision at load ({stacks})")
        return ExmyMoEMethod(layer.moe_config, prefix, experts), names
    if isinstance(layer, VocabParallelEmbedding):
        found = tensors.get(f"{prefix}.weight")
        if not found:
            return None, ()
        # an lm_head with a record of its own is untied; an input table tied to the lm_head must stay a real
        # parameter (vLLM ties by assigning layer.weight)
        if (isinstance(layer, ParallelLMHead) or not _tied_embeddings()) and _cannot_pack(layer, {None: found}) is None:
            return ExmyPackedEmbeddingMethod(prefix, {None: found}), [f"{prefix}.weight"]
        return ExmyEmbeddingMethod(prefix, {None: found}), [f"{prefix}.weight"]
    return None, ()


def _tied_embeddings() -> bool:
    """Whether the model being built ties its lm_head to the input embeddings (transformers' default: tied)."""
    from vllm.config import get_current_vllm_config

    model_config = get_current_vllm_config().model_config
    return model_config is None or bool(getattr(model_config.hf_text_config, "tie_word_embeddings", True))


def _linear_shards(config, layer, prefix: str) -> tuple[dict, list]:
    """({shard id: (TensorRecord, scale dtype) or None}, tensor names) of a linear layer, in vLLM's shard order."""
    tensors = config.tensors
    parent, _, leaf = prefix.rpartition(".")
    parts = config.packed_modules_mapping.get(leaf)
    if not parts or f"{prefix}.weight" in tensors:  # not fused, or fused in the checkpoint already
        return {None: tensors.get(f"{prefix}.weight")}, [f"{prefix}.weight"]
    names = [f"{parent}.{p}.weight" if parent else f"{p}.weight" for p in parts]
    ids = ["q", "k", "v"] if isinstance(layer, QKVParallelLinear) and len(parts) == 3 else range(len(parts))
    return {i: tensors.get(n) for i, n in zip(ids, names)}, names


def _cannot_pack(layer, shards: dict) -> str | None:
    """Why the layer cannot stay packed, or None."""
    found = list(shards.values())
    if not all(found):
        return "its fused shards are partly quantized, partly not"
    if len({(r.fmt.name, r.group_size, r.shape[1:]) for r, _ in found}) > 1:
        kinds = ", ".join(f"{r.fmt.name}" + ("" if r.group_size == r.k else f"-g{r.group_size}") for r, _ in found)
        return f"vLLM fuses its shards into one layer and they are stored in different formats ({kinds}); " \
               "convert with fused partners tied (the default of --format auto)"
    record = found[0][0]
    if len(record.shape) != 2:
        return f"a {len(record.shape)}-D weight"
    if isinstance(layer, RowParallelLinear) and layer.tp_size > 1:
        k = layer.input_size_per_partition
        try:
            slice_k(None, None, record.fmt, record.k, record.group_size, layer.tp_rank * k, k)
        except ExmyError as err:
            return f"tensor parallelism {layer.tp_size} splits K={record.k} so that {err}"
    return None


def _expert_records(tensors: dict, layer, prefix: str) -> tuple[dict, list]:
    """({(expert id, "w1"/"w2"/"w3"): (TensorRecord, scale dtype)}, names) of a fused-MoE layer's experts."""
    shard_of = {layer.ckpt_gate_proj_name: "w1", layer.ckpt_up_proj_name: "w3", layer.ckpt_down_proj_name: "w2"}
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.([^.]+)\.weight")
    out = {}
    for name, found in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        m = pattern.fullmatch(name)
        if m is None or m[2] not in shard_of:
            raise ExmyError(f"exmy: quantized expert tensor {name} is not one vLLM's fused-MoE loader takes "
                            f"per expert ({', '.join(sorted(shard_of))}); not supported in vLLM yet")
        out[(int(m[1]), shard_of[m[2]])] = found
    return out, [name for name in tensors if name.startswith(prefix + ".")]


class _Stack(NamedTuple):
    """One packed projection of every local expert as this rank holds it: [E, n, row_bytes(fmt, k)] codes and
    [E, n, groups] scales, loaded as ``load_dtype`` (the stored 16-bit dtype, or float32 values of 8-bit
    scales, narrowed after loading)."""
    fmt: ExMy
    k: int
    n: int
    group_size: int | None
    load_dtype: torch.dtype


def _expert_stacks(layer, experts: dict) -> dict | str:
    """{"w13": _Stack, "w2": _Stack} of this rank's packed experts (each expert's gate rows then up rows,
    as vLLM's w13; down as w2), or why they cannot stay packed."""
    moe = layer.moe_config
    if moe.activation.value != "silu" or not moe.is_act_and_mul or layer.apply_router_weight_on_input:
        return f"activation {moe.activation.value} (the packed experts run silu(gate) * up)"
    if layer.use_ep:
        return "expert parallelism"
    e, tp, part = layer.global_num_experts, moe.moe_parallel_config.tp_size, moe.intermediate_size_per_partition
    out = {}
    for stem, shards in (("w13", ("w1", "w3")), ("w2", ("w2",))):
        found = [experts.get((i, shard)) for i in range(e) for shard in shards]
        if not all(found):
            return "some experts are not quantized"
        records = [r for r, _ in found]
        first = records[0]
        if len({(r.fmt.name, r.shape, r.group_size) for r in records}) > 1:
            return f"the experts' {stem} tensors are stored in different formats or group sizes"
        dtypes = {d for _, d in found}
        if len(dtypes) > 1 and dtypes != {"F8_E4M3"}:
            return f"the experts' {stem} scales are stored in different dtypes ({', '.join(sorted(dtypes))})"
        n, k = first.shape
        if stem == "w13":
            n //= tp
        elif tp > 1:
            try:
                slice_k(None, None, first.fmt, k, first.group_size, moe.tp_rank * part, part)
            except ExmyError as err:
                return f"tensor parallelism {tp} splits K={k} so that {err}"
            k = part
        group = first.group_size if first.group_size < first.k else None
        out[stem] = _Stack(first.fmt, k, n * len(shards), group, TORCH_DTYPE.get(dtypes.pop(), torch.float32))
    return out


# ----------------------------------------------------------------------------- packed linear layers

class ExmyLinearMethod(LinearMethodBase):
    """A linear layer whose weight stays packed ExMy (see the module docstring)."""

    def __init__(self, prefix: str, shards: dict):
        self.prefix = prefix
        found = list(shards.values())
        record = found[0][0]
        self.fmt, self.k, self.group_size = record.fmt, record.k, record.group_size
        self.record = record  # (its layout: how the stored rows are padded)
        self.scale_exps = {shard: r.scale_exp for shard, (r, _) in shards.items()}  # 8-bit scales' powers of two
        scale_dtypes = {s for _, s in found}
        # one stored 16-bit dtype as it is; else (fp16 and bf16 shards, 8-bit scales) float32 values,
        # exact for all, narrowed after loading where one 16-bit dtype holds them all
        self.scale_dtype = TORCH_DTYPE.get(scale_dtypes.pop(), torch.float32) if len(scale_dtypes) == 1 \
            else torch.float32

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int], input_size: int,
                       output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        loader = extra_weight_attrs.pop("weight_loader")
        if input_size != self.k:
            raise ExmyError(f"exmy: {self.prefix}: the checkpoint's weight has K={self.k}, the model's layer "
                            f"{input_size}")
        k = input_size_per_partition
        start = layer.tp_rank * k if k != self.k else 0
        spec = PackedLinear(self.fmt, k, sum(output_partition_sizes), self.group_size if self.group_size < self.k
                            else None)
        packed = Parameter(torch.empty(spec.n, spec.row_bytes, dtype=torch.uint8), requires_grad=False)
        scale = Parameter(torch.empty(spec.n, spec.ngroups, dtype=self.scale_dtype), requires_grad=False)
        for name, param in (("weight_packed", packed), ("weight_scale", scale)):
            set_weight_attrs(param, {"output_dim": 0, "weight_loader": self._loader(loader, name, start, k, spec)})
            set_weight_attrs(param, extra_weight_attrs)
            layer.register_parameter(name, param)
        layer.exmy = spec

    def _loader(self, base, name: str, start: int, k: int, spec: PackedLinear):
        """vLLM's loader of the layer (rows of fused shards, column-parallel slices), after cutting
        this rank's K range out of the checkpoint tensor for a row-parallel layer. Packed rows are written
        in row order (a reload too: process_weights_after_loading lays them out again)."""
        def load(param, loaded_weight, *args, **kwargs):
            if name == "weight_packed":
                spec.in_row_order()
            if name == "weight_scale":
                shard = args[0] if args else kwargs.get("loaded_shard_id")
                loaded_weight = scale_values(loaded_weight, self.scale_exps.get(shard, self.record.scale_exp))
            if name == "weight_scale" and loaded_weight.dtype != param.dtype and param.dtype != torch.float32:
                raise ExmyError(f"exmy: {self.prefix}: scales stored as {loaded_weight.dtype}, the header said "
                                f"{param.dtype}")
            if name == "weight_packed":
                loaded_weight = self.record.payload(loaded_weight)
            if k != self.k:
                packed, scale, _ = slice_k(loaded_weight if name == "weight_packed" else None,
                                           loaded_weight if name == "weight_scale" else None,
                                           self.fmt, self.k, self.group_size, start, k)
                loaded_weight = packed if name == "weight_packed" else scale
            return base(param, loaded_weight, *args, **kwargs)
        return load

    def process_weights_after_loading(self, layer) -> None:
        if layer.weight_scale.dtype == torch.float32:  # 16 bits where they hold every value (8-bit scales do)
            narrow = narrowed_scales(layer.weight_scale.data, self.fmt)
            if narrow is not None:
                layer.weight_scale = Parameter(narrow, requires_grad=False)
        if layer.weight_packed.is_cuda:  # kernels, scales and launch plans ready before any CUDA-graph capture
            aligned = kernel_rows(layer.weight_packed.data)  # rows the kernels read in place (16-byte aligned)
            tiled = layer.exmy.tile_ordered(aligned) if self.tiles(layer) else None  # the GEMV's fastest order
            if tiled is not None or aligned is not layer.weight_packed.data:
                layer.weight_packed = Parameter(aligned if tiled is None else tiled, requires_grad=False)
            layer.exmy.prepare(layer.weight_packed, layer.weight_scale, layer.params_dtype)

    def tiles(self, layer) -> bool:
        """Whether the layer's packed weight is laid out in tile order on the GPU (PackedLinear.tile_ordered):
        wherever only the linear op reads it."""
        return True

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.exmyconv.packed_linear(x, layer.weight_packed, layer.weight_scale, bias, layer.exmy.handle)

    def dequantize_weight(self, layer) -> torch.Tensor:
        return layer.exmy.dequantize(layer.weight_packed, layer.weight_scale, layer.params_dtype)


class ExmyPackedEmbeddingMethod(ExmyLinearMethod):
    """An untied embedding table or lm_head kept packed: the packed linear method's parameters, filled by
    vLLM's vocab-parallel loader (this rank's rows, padding rows zero: they decode to 0); the lm_head
    runs the packed linear op, a lookup decodes only the rows it returns (codec.dequantize_rows)."""

    def tiles(self, layer) -> bool:
        return isinstance(layer, ParallelLMHead)  # (an input table is read by rows: dequantize_rows)

    def embedding(self, layer, input_: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(layer.weight_packed, layer.weight_scale, input_, self.fmt, self.k, self.group_size,
                               layer.params_dtype)


# ----------------------------------------------------------------------------- decoded at load

class _DequantOnLoad:
    """Loaders for ``<stem>_packed`` / ``<stem>_scale``: each quantized tensor's two parts are paired as
    they arrive, decoded by the torch codec into the full-precision dtype (what ``exmyconv dequantize``
    writes) and handed to the full-precision parameter's own vLLM loader (``forward``)."""

    def __init__(self, where: str, records: dict, dtype: torch.dtype, key, forward):
        self.where, self.records, self.dtype, self.key, self.forward = where, records, dtype, key, forward
        self.pending: dict = {}

    def attach(self, layer, stem: str) -> None:
        for part in ("packed", "scale"):
            param = Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._loader(part)})
            layer.register_parameter(f"{stem}_{part}", param)
        self.stem = stem

    def _loader(self, part: str):
        def load(param, loaded_weight, *args, **kwargs):
            key = self.key(*args, **kwargs)
            if key is _ELSEWHERE:  # not this rank's (an expert elsewhere)
                return False
            parts = self.pending.setdefault(key, {})
            parts[part] = loaded_weight.clone()
            if len(parts) < 2:
                return True
            del self.pending[key]
            record = self.records.get(key)
            if record is None:
                raise ExmyError(f"exmy: {self.where}: a quantized tensor ({key}) that the checkpoint's headers "
                                "do not list")
            record = record[0]
            weight = dequantize(record.payload(parts["packed"]), scale_values(parts["scale"], record.scale_exp),
                                record.fmt, record.k, record.group_size, self.dtype)
            result = self.forward(weight, *args, **kwargs)
            return True if result is None else result
        return load

    def finish(self, layer) -> None:
        if self.pending:
            key, parts = next(iter(self.pending.items()))
            raise ExmyError(f"exmy: {self.where}: {key}: only the {', '.join(parts)} part was loaded")
        for part in ("packed", "scale"):
            delattr(layer, f"{self.stem}_{part}")


def _shard_arg(shard_id):
    return () if shard_id is None else (shard_id,)


class ExmyDequantLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear method; the quantized shards are decoded at load."""

    def __init__(self, prefix: str, shards: dict):
        super().__init__()
        self.prefix, self.shards = prefix, {k: v for k, v in shards.items() if v}

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra_weight_attrs)
        weight = layer.weight
        self.stash = _DequantOnLoad(self.prefix, self.shards, params_dtype, key=lambda shard_id=None: shard_id,
                                    forward=lambda w, shard_id=None: weight.weight_loader(weight, w,
                                                                                          *_shard_arg(shard_id)))
        self.stash.attach(layer, "weight")

    def process_weights_after_loading(self, layer) -> None:
        self.stash.finish(layer)
        super().process_weights_after_loading(layer)


class ExmyEmbeddingMethod(UnquantizedEmbeddingMethod):
    """vLLM's unquantized embedding (or lm_head) method; the quantized table is decoded at load."""

    def __init__(self, prefix: str, shards: dict):
        super().__init__()
        self.prefix, self.shards = prefix, shards

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               params_dtype, **extra_weight_attrs)
        weight = layer.weight
        self.stash = _DequantOnLoad(self.prefix, self.shards, params_dtype, key=lambda: None,
                                    forward=lambda w: weight.weight_loader(weight, w))  # one shard: key None
        self.stash.attach(layer, "weight")

    def process_weights_after_loading(self, layer) -> None:
        self.stash.finish(layer)
        super().process_weights_after_loading(layer)


class ExmyMoEMethod(UnquantizedFusedMoEMethod):
    """vLLM's unquantized fused-MoE method; the experts are decoded at load (full-precision memory)."""

    def __init__(self, moe, prefix: str, experts: dict):
        super().__init__(moe)
        self.prefix, self.experts = prefix, experts

    @property
    def supports_eplb(self) -> bool:
        return False  # the records are per logical expert

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                               **extra_weight_attrs)

        def key(weight_name, shard_id, expert_id, return_success=False, **_):
            if layer._map_global_expert_id_to_local_expert_id(expert_id) == -1:
                return _ELSEWHERE
            return (expert_id, shard_id)

        self.stashes = []
        for stem in ("w13_weight", "w2_weight"):
            target = getattr(layer, stem)

            def forward(w, weight_name, shard_id, expert_id, return_success=False, target=target, **_):
                return target.weight_loader(target, w, weight_name.rsplit("_", 1)[0], shard_id, expert_id,
                                            return_success=True)

            stash = _DequantOnLoad(self.prefix, self.experts, params_dtype, key=key, forward=forward)
            stash.attach(layer, stem)
            self.stashes.append(stash)

    def process_weights_after_loading(self, layer) -> None:
        for stash in self.stashes:
            stash.finish(layer)
        super().process_weights_after_loading(layer)


# ----------------------------------------------------------------------------- packed MoE experts

class ExmyPackedMoEMethod(FusedMoEMethodBase):
    """A fused-MoE layer whose experts stay packed: parameters ``w13_weight_packed`` / ``w13_weight_scale``
    (each local expert's gate rows then up rows, as vLLM's ``w13_weight``) and ``w2_weight_packed`` /
    ``w2_weight_scale``, filled by this method's loaders from the per-expert checkpoint tensors (this
    rank's rows of gate/up, its K range of down). Compute: :class:`exmyconv.torch.experts.ExmyExperts`
    over those parameters, through its op, on the routing vLLM's router chose (shared experts are run
    by vLLM before, as for any method without a modular kernel)."""

    def __init__(self, moe, prefix: str, experts: dict, stacks: dict):
        super().__init__(moe)
        self.prefix, self.experts, self.stacks = prefix, experts, stacks
        self.module: ExmyExperts | None = None

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        for stem, st in self.stacks.items():
            _, ngroups = groups_of(st.k, st.group_size)
            for part, shape, dtype in (("packed", (num_experts, st.n, row_bytes(st.fmt, st.k)), torch.uint8),
                                       ("scale", (num_experts, st.n, ngroups), st.load_dtype)):
                param = Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
                set_weight_attrs(param, {"weight_loader": self._loader(layer, stem, part)})
                layer.register_parameter(f"{stem}_weight_{part}", param)
        self.params_dtype = params_dtype

    def _loader(self, layer, stem: str, part: str):
        st = self.stacks[stem]

        def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False, **_):
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if local == -1:  # (not this rank's expert)
                return False
            found = self.experts.get((expert_id, shard_id))
            if found is None:
                raise ExmyError(f"exmy: {self.prefix}: expert {expert_id} {shard_id}: a quantized tensor that the "
                                "checkpoint's headers do not list")
            record = found[0]
            if part == "packed":
                data = record.payload(loaded_weight)
            elif record.scale_exp is not None or loaded_weight.dtype == param.dtype:
                data = scale_values(loaded_weight, record.scale_exp)
            else:
                raise ExmyError(f"exmy: {self.prefix}: scales stored as {loaded_weight.dtype}, the header said "
                                f"{param.dtype}")
            target = param.data[local]
            if shard_id == "w2":
                if st.k != record.k:  # this rank's K range of down (row parallel)
                    packed, scale, _ = slice_k(data if part == "packed" else None, data if part == "scale" else None,
                                               record.fmt, record.k, record.group_size, layer.moe_config.tp_rank
                                               * st.k, st.k)
                    data = packed if part == "packed" else scale
            else:  # this rank's rows of gate (first half of w13) or up (second half)
                rows = st.n // 2
                data = data[layer.moe_config.tp_rank * rows:][:rows]
                target = target[:rows] if shard_id == "w1" else target[rows:]
            if tuple(data.shape) != tuple(target.shape):
                raise ExmyError(f"exmy: {self.prefix}: expert {expert_id} {shard_id} {part}: {list(data.shape)} "
                                f"does not fit {list(target.shape)}")
            target.copy_(data)
            return True
        return load

    def process_weights_after_loading(self, layer) -> None:
        weights, tensors = {}, {}
        for stem, name in (("w13", "gate_up_proj"), ("w2", "down_proj")):
            st = self.stacks[stem]
            packed, scale = getattr(layer, f"{stem}_weight_packed"), getattr(layer, f"{stem}_weight_scale")
            if scale.dtype == torch.float32:  # 8-bit scales' values: one exact 16-bit tensor
                narrow = narrowed_scales(scale.data, st.fmt)
                if narrow is None:
                    raise ExmyError(f"exmy: {self.prefix}: {stem} scales fit no 16-bit dtype exactly")
                scale = Parameter(narrow, requires_grad=False)
                setattr(layer, f"{stem}_weight_scale", scale)
            aligned = kernel_rows(packed.data)  # rows the kernels read in place (16-byte aligned), on the GPU
            if aligned is not packed.data:
                packed = Parameter(aligned, requires_grad=False)
                setattr(layer, f"{stem}_weight_packed", packed)
            weights[name] = ExpertWeights(st.fmt, st.k, st.n, st.group_size, scale.dtype)
            tensors[name + "_packed"], tensors[name + "_scale"] = packed.data, scale.data
        self.module = ExmyExperts.over(weights["gate_up_proj"], weights["down_proj"], torch.nn.SiLU(), tensors,
                                       self.params_dtype)
        self.module.align_rows()  # on the GPU: tile order, in tensors of the module's own; the layer takes them
        for stem, name in (("w13", "gate_up_proj"), ("w2", "down_proj")):
            if self.module.order(name) == "tile":
                setattr(layer, f"{stem}_weight_packed", Parameter(self.module._buffers[name + "_packed"],
                                                                  requires_grad=False))

    def get_fused_moe_quant_config(self, layer):
        return None  # (no modular kernel: apply computes the experts itself)

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        return torch.ops.exmyconv.experts(x, topk_ids.long(), topk_weights, layer.w13_weight_packed,
                                          layer.w13_weight_scale, layer.w2_weight_packed, layer.w2_weight_scale,
                                          self.module._handle)


# ----------------------------------------------------------------------------- the weight stream

class DecodingMapper(WeightsMapper):
    """vLLM's checkpoint-name mapper, plus: quantized tensors no method claimed are decoded in the stream.

    vLLM's AutoWeightsLoader combines the model's mapper with the quantization config's
    ``get_checkpoint_weight_mapper()`` (``mapper |= ...``) and runs ``mapper.apply(weights)``. This
    subclass keeps itself through those combinations (``__ror__`` runs first because it subclasses
    the left operand's type) and, after the renames, replaces each ``T_packed`` / ``T_scale`` pair of a
    record that no layer method took by ``T`` in float32 (exact; the plain loader's copy into its
    parameter rounds once, as ``exmyconv dequantize`` does)."""

    config = None

    @classmethod
    def wrap(cls, mapper: WeightsMapper, config) -> "DecodingMapper":
        out = cls(**{k: getattr(mapper, k) for k in WeightsMapper.__dataclass_fields__})
        out.config = config
        return out

    def __or__(self, other):
        return DecodingMapper.wrap(WeightsMapper.__or__(self, other), self.config)

    def __ror__(self, other):
        return DecodingMapper.wrap(WeightsMapper.__or__(other, self), self.config)

    def apply(self, weights):
        return decode_unclaimed(self.config, WeightsMapper.apply(self, weights))


def decode_unclaimed(config, weights):
    """The weight stream with every unclaimed quantized tensor decoded (see DecodingMapper)."""
    pending: dict = {}
    for name, tensor in weights:
        suffix = PACKED_SUFFIX if name.endswith(PACKED_SUFFIX) else SCALE_SUFFIX if name.endswith(SCALE_SUFFIX) \
            else None
        stem = name[:-len(suffix)] if suffix else None
        found = config.tensors.get(stem) if stem is not None else None
        if found is None or stem in config.claimed:
            yield name, tensor
            continue
        parts = pending.setdefault(stem, {})
        parts[suffix] = tensor.clone()
        if len(parts) == 2:
            del pending[stem]
            record = found[0]
            scale = scale_values(parts[SCALE_SUFFIX], record.scale_exp)
            yield stem, dequantize(record.payload(parts[PACKED_SUFFIX]), scale, record.fmt, record.k,
                                   record.group_size, torch.float32)
    if pending:
        stem, parts = next(iter(pending.items()))
        raise ExmyError(f"exmy: {stem}: only {', '.join(parts)} was in the checkpoint")
