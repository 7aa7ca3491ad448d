"""The torch layer: one torch codec (``codec``: encode, scales, decode on CPU or CUDA tensors), the packed
``ExmyLinear`` module (``linear``) and its sibling groups (``siblings``: q/k/v, gate/up as one layer), the packed MoE experts ``ExmyExperts`` (``experts``) and embedding
table ``ExmyEmbedding`` (``embedding``), ``PackedLinear`` and its op ``exmyconv::packed_linear`` for engines
that own the packed tensors (``packed``: the vLLM plugin's compute) and ``load_state_dict`` (``state_dict``).

Used by the format search, the integrations and the CPU compute path.
Imports: ``format``, ``io``, ``cuda`` (and ``errors``).
"""
