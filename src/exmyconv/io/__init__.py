"""Bytes on disk: safetensors reading and writing, sources, output folders, converted checkpoints.

Owns the validating safetensors reader and the streaming writer, a checkpoint folder's files
(``folder``), where a conversion reads from (``source``: a local folder first, ``@example`` models, the
Hub as one resolver among others in ``hub``), the atomic output folder (``output``) and reading a
converted checkpoint back (``checkpoint``).

Imports: ``format`` (and ``errors``). A local folder is read without importing the Hub code.
"""
