"""The torch layer: one torch codec (``codec``: encode, scales, decode on CPU or CUDA tensors), the packed
``ExmyLinear`` module (``linear``) and ``load_state_dict`` (``state_dict``).

Used by the format search, the integrations and the CPU compute path.
Imports: ``format``, ``io``, ``cuda`` (and ``errors``).
"""
