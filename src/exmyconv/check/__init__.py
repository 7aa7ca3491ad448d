"""Reports on a checkpoint: ``inspect`` (what it holds, bits, errors, integrity) and ``verify`` (decode
everything again; bit-exact against the GPU dequantizer when there is one).

Imports: ``format``, ``io``, ``cuda`` (and ``errors``).
"""
