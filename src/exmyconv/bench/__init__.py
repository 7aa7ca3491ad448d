"""Benchmarks: GPU kernels against torch fp16 (``kernels``), end-to-end decoding (``e2e``), and the integer
round-to-nearest baselines of the quality comparison (``baselines``).

Imports: any floor below; nothing imports it but the command line.
"""
