"""Conversion: the pipeline stream (read -> plan -> search -> quantize -> pack -> write), the format
search (``search``, ``search_torch``), calibration, and the way back (``dequantize``).

Imports: ``format``, ``io``, ``cuda``, ``torch`` (and ``errors``, ``_version``).
"""
