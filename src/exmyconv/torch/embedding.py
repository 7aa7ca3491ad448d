"""ExmyEmbedding: an embedding table kept packed ExMy; a lookup decodes only the rows it returns.

Buffers ``weight_packed`` (uint8 [num_embeddings, row_bytes]) and ``weight_scale`` (as stored: fp16/bf16,
or float8_e4m3fn with ``scale_exp``; [num_embeddings, ngroups]) hold the checkpoint's tensors byte for
byte. Each row of a packed tensor is packed on its own (formats/SPEC.md section 3), so gathering rows of
the payload and of the scales, then decoding them with the torch codec, gives exactly the rows of the
dequantized table (decode x scale in float32, one rounding to ``weight_dtype``): a lookup is bitwise
``nn.Embedding`` holding ``exmyconv dequantize``'s weight. Memory stays at the packed size; a call
decodes as many rows as it looks up (one per token when decoding). Under ``torch.compile`` the lookup is
one custom op, ``torch.ops.exmyconv.embedding`` (a fake implementation gives its shape), as
``ExmyLinear`` is ``exmyconv::linear``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ExmyError
from ..format.exmy import ExMy, get_format
from ..format.pack import row_bytes
from ..format.quant import groups_of
from .codec import SCALE_NAME, dequantize, dequantize_rows, scale_values
from .linear import apply_keeping_scales, live_module, register_handle


class ExmyEmbedding(nn.Module):
    """``nn.Embedding(num_embeddings, embedding_dim, padding_idx)`` with a packed table (module docstring).

    ``weight`` is a read-only property for code that inspects the table: each access decodes the whole
    table in ``weight_dtype`` (the dtype the model was loaded in; follows ``.to(dtype)``)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: ExMy | str, group_size: int | None = None,
                 padding_idx: int | None = None, scale_dtype: torch.dtype = torch.float16,
                 scale_exp: int | None = None, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = padding_idx
        self.fmt = get_format(fmt) if isinstance(fmt, str) else fmt
        self.group_size, ngroups = groups_of(self.embedding_dim, group_size)
        if (scale_dtype == torch.float8_e4m3fn) != (scale_exp is not None) or (
                scale_dtype not in SCALE_NAME and scale_dtype != torch.float8_e4m3fn):
            raise ExmyError(f"scales are float16 or bfloat16, or float8_e4m3fn with a scale_exp; not {scale_dtype} "
                            f"with scale_exp {scale_exp}")
        self.scale_exp = scale_exp
        self.weight_dtype = dtype or torch.get_default_dtype()
        self.register_buffer("weight_packed", torch.empty(
            (self.num_embeddings, row_bytes(self.fmt, self.embedding_dim)), dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty((self.num_embeddings, ngroups), dtype=scale_dtype,
                                                         device=device))
        self._handle = register_handle(self)  # for the compiled op

    def __setstate__(self, state):
        super().__setstate__(state)
        self._handle = register_handle(self)  # copies and unpickled modules get their own

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, fmt: ExMy | str, group_size: int | None,
                       scale_dtype: torch.dtype = torch.float16, scale_exp: int | None = None) -> "ExmyEmbedding":
        """An ExmyEmbedding for ``embedding``'s shape, padding index, device and dtype."""
        if embedding.max_norm is not None or embedding.sparse:
            raise ExmyError("a packed embedding cannot renormalize rows (max_norm) or give sparse gradients")
        return cls(embedding.num_embeddings, embedding.embedding_dim, fmt, group_size, embedding.padding_idx,
                   scale_dtype, scale_exp, device=embedding.weight.device, dtype=embedding.weight.dtype)

    def extra_repr(self) -> str:
        g = "" if self.group_size == self.embedding_dim else f", group_size={self.group_size}"
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}{g}{pad}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.exmyconv.embedding(ids, self.weight_packed, self.weight_scale, self._handle,
                                                self.weight_dtype)
        return self._lookup(ids, self.weight_packed, self.weight_scale, self.weight_dtype)

    def _lookup(self, ids, packed, scale, dtype):
        return dequantize_rows(packed, scale, ids, self.fmt, self.embedding_dim, self.group_size, dtype,
                               self.scale_exp)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The table [num_embeddings, embedding_dim] as ``dtype`` (default ``weight_dtype``), a new tensor."""
        return dequantize(self.weight_packed, scale_values(self.weight_scale, self.scale_exp), self.fmt,
                          self.embedding_dim, self.group_size, dtype or self.weight_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A decoded copy of the table in ``weight_dtype`` (for code that inspects ``.weight``; costs a decode)."""
        return self.dequantize_weight()

    def _apply(self, fn, recurse=True):
        """``.to(...)``: :func:`exmyconv.torch.linear.apply_keeping_scales` (the lookup dtype follows)."""
        return apply_keeping_scales(self, fn, recurse, super()._apply)


@torch.library.custom_op("exmyconv::embedding", mutates_args=())
def embedding_op(ids: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, handle: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The rows ``ids`` of ``ExmyEmbedding`` number ``handle``'s table as ``dtype`` (its buffers are the tensor
    arguments, so the graph sees the dependency; the module supplies the format)."""
    return live_module(handle, "embedding")._lookup(ids, packed, scale, dtype)


@embedding_op.register_fake
def _(ids, packed, scale, handle, dtype):
    return packed.new_empty((*ids.shape, live_module(handle, "embedding").embedding_dim), dtype=dtype)
