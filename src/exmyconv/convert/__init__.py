"""Conversion: the pipeline stream (read -> plan -> search -> quantize -> pack -> write), the format
search (``search``, ``search_torch``), calibration, error-compensating rounding (``gptq``, ``gptq_torch``), the way
back (``dequantize``), and the scale-out pieces of issue 19: shards planned by bytes with fused
partners together (``units``), the resume journal of a temporary output folder (``resume``), and the
units of work run as Ray tasks (``ray_runner``; Ray is imported lazily, only for ``--ray``).

Imports: ``format``, ``io``, ``cuda``, ``torch`` (and ``errors``, ``_version``).
"""
