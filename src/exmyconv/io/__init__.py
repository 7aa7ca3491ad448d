"""Bytes on disk: safetensors reading and writing, sources, output folders, converted checkpoints.

Owns what a valid checkpoint is (``validate``: every rule, for every reader), the safetensors reader
and the streaming writer, where a conversion reads from (``source``: a local folder first, ``@example`` models, the
Hub as one resolver among others in ``hub``), the atomic output folder (``output``) and reading a
converted checkpoint back (``checkpoint``).

Imports: ``format`` (and ``errors``). A local folder is read without importing the Hub code.
"""
