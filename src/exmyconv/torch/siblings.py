"""Sibling layers computed as one: the q/k/v projections of an attention block (and gate/up of a
gated MLP) read the same input, so one GEMV over all their rows does the work of three (or two).

In decoding, each such layer is a matrix-vector product whose time is mostly the kernel's fixed
latency, not its bytes (the small k/v layers of Llama-3-8B move 2.6 MB each, under a microsecond at
the H200's bandwidth). transformers' models call the three layers one after another with the same
tensor, and they have no fused module of their own, so the fusion happens below them:

- :func:`fuse_siblings` (called by the transformers loader) lays the packed rows and scales of each
  group of :data:`SIBLINGS` out as one buffer; the members' ``weight_packed`` / ``weight_scale``
  become row views of it (no extra memory; state dicts are unchanged), and :class:`SiblingGroup`
  holds an ExmyLinear of all the rows (not a submodule).
- The first member called computes y = x [W_1; W_2; ...]^T and keeps (x, y); the others, called with
  the same tensor, return their columns of y (views; a member's bias is added to its own columns).
  Under ``torch.compile`` the same Python traces into one ``exmyconv::linear_siblings`` op (its
  tensors are the members' own buffers, so CUDA graphs treat them as static).
- Anything else (a member called with another input, or twice before the others, as cross-attention
  does) dissolves the group for good: each member computes alone again, correctly. So does
  ``.to()`` on a member, and a call that needs x's gradient takes the member's own op.

Only CUDA groups are fused (:data:`DEVICES`: the GEMV's latency is what this saves; on the CPU a
bigger F.linear gains nothing and would change summation orders). docs/benchmarks.md has the
measurements (H100, 2026-12-05).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from .codec import dequantize, scale_values
from .linear import ExmyLinear, live_module, register_handle

# Children of one module that read the same input (the names transformers' models use).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))
# Where one layer of all the rows pays: CUDA, where the GEMV's fixed latency is what it saves.
DEVICES = ("cuda",)


def fuse_siblings(model: nn.Module) -> int:
    """Group every set of :data:`SIBLINGS` children that are compatible ExmyLinear layers on one of
    :data:`DEVICES` (same input size, format, group size, scale type and decode dtype; not grouped yet) into a
    :class:`SiblingGroup`. Returns the number of groups made."""
    made = 0
    for parent in model.modules():
        for names in SIBLINGS:
            members = [parent._modules.get(name) for name in names]
            if fusible(members):
                SiblingGroup(members)
                made += 1
    return made


def fusible(members) -> bool:
    if not all(isinstance(m, ExmyLinear) and m._siblings is None for m in members):
        return False
    first = members[0]
    key = lambda m: (m.in_features, m.fmt, m.group_size, m.scale_exp, m.weight_dtype,  # noqa: E731
                     m.weight_scale.dtype, m.weight_packed.device)
    return first.weight_packed.device.type in DEVICES and all(key(m) == key(first) for m in members)


class SiblingGroup:
    """ExmyLinear layers with one input, whose rows are laid out as one weight (see the module docstring).

    ``members``: the layers, in the order of their rows; ``bounds``: each one's rows (lo, hi) of the
    whole; ``fused``: an ExmyLinear of all the rows, whose buffers the members' are views of.
    """

    def __init__(self, members: List[ExmyLinear]):
        first = members[0]
        rb = first.weight_packed.shape[1]
        stride = -(-rb // 16) * 16  # 16-byte aligned rows: the kernels read every view in place
        n = sum(m.out_features for m in members)
        device = first.weight_packed.device
        packed = torch.zeros((n, stride), dtype=torch.uint8, device=device)[:, :rb]
        scale = torch.empty((n, first.weight_scale.shape[1]), dtype=first.weight_scale.dtype, device=device)
        self.fused = ExmyLinear(first.in_features, n, first.fmt, first.group_size, bias=False,
                                scale_dtype=scale.dtype, device="meta", dtype=first.weight_dtype,
                                scale_exp=first.scale_exp)
        self.fused._buffers.update(weight_packed=packed, weight_scale=scale)
        # Tile order (ExmyLinear.align_rows) where every member has it: each member's rows are whole tiles,
        # so the buffer is the members' tiles one after another, in tile order as a whole. Else row order
        # for good: the layer of all the rows must not reorder the members' views.
        tiled = all(m._tiled is m.weight_packed for m in members)
        self.fused._may_tile = tiled
        self.members, self.bounds, lo = list(members), [], 0
        for i, m in enumerate(members):
            hi = lo + m.out_features
            packed[lo:hi].copy_(m.weight_packed if tiled else m.in_row_order(m.weight_packed))
            scale[lo:hi].copy_(m.weight_scale)
            m._buffers.update(weight_packed=packed[lo:hi], weight_scale=scale[lo:hi])
            m._gpu_weight_cache, m._launches, m._siblings = None, {}, (self, i)
            m._tiled, m._may_tile = m._buffers["weight_packed"] if tiled else None, tiled
            self.bounds.append((lo, hi))
            lo = hi
        self.fused._tiled = packed if tiled else None
        self.everyone = (1 << len(members)) - 1
        self.pending = None  # (x, y, members served, x._version) between the first and the last call
        self._handle = register_handle(self)

    def __setstate__(self, state):  # copies get a handle of their own
        self.__dict__.update(state)
        self._handle = register_handle(self)

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member ``i``'s columns of y = x W^T (without its bias), or None once the group has dissolved."""
        p = self.pending
        compiling = torch.compiler.is_compiling()  # (x._version does not trace; the graph is fixed anyway)
        if p is None:
            y, served = self._compute(x), 1 << i
        elif p[0] is x and not p[2] >> i & 1 and (compiling or p[3] == x._version):
            y, served = p[1], p[2] | 1 << i
        else:
            self.dissolve()
            return None
        self.pending = None if served == self.everyone else (x, y, served, 0 if compiling else x._version)
        lo, hi = self.bounds[i]
        return y[..., lo:hi]

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.exmyconv.linear_siblings(x, [m.weight_packed for m in self.members],
                                                      [m.weight_scale for m in self.members], self._handle)
        return self.fused._forward(x)

    def dissolve(self) -> None:
        """Every member computes alone from now on (their buffers stay views of the whole)."""
        for m in self.members:
            m._siblings = None
        self.pending = None

    def holds(self, packed: List[torch.Tensor], scale: List[torch.Tensor]) -> bool:
        """Whether these are the members' buffers, still views of the whole."""
        return len(packed) == len(self.members) and all(
            p.data_ptr() == m.weight_packed.data_ptr() and s.data_ptr() == m.weight_scale.data_ptr()
            for p, s, m in zip(packed, scale, self.members)) and all(m._siblings is not None for m in self.members)


@torch.library.custom_op("exmyconv::linear_siblings", mutates_args=())
def siblings_op(x: torch.Tensor, packed: List[torch.Tensor], scale: List[torch.Tensor], handle: int) -> torch.Tensor:
    """x [..., K] times the rows of every packed weight of :class:`SiblingGroup` number ``handle``, one
    after another: [..., sum of their rows]. Computed as one layer when they are the group's buffers."""
    group = live_module(handle, "linear_siblings")
    if group.holds(packed, scale):
        return group.fused._forward(x)
    f = group.fused
    return torch.cat([F.linear(x, dequantize(m.in_row_order(p), scale_values(s, f.scale_exp), f.fmt, f.in_features,
                                             f.group_size, x.dtype)) for p, s, m in zip(packed, scale, group.members)], -1)


@siblings_op.register_fake
def _(x, packed, scale, handle):
    return x.new_empty((*x.shape[:-1], sum(p.shape[0] for p in packed)))
