"""The ExMy format itself: the numpy reference of formats/SPEC.md.

Owns the format definition (``ExMy``, names), scales and the encode/decode reference (``quant``), bit
planes (``pack``), fp16/bf16 handling (``dtypes``), tensor records, the layout version and every file
name of a checkpoint folder (``layout``).

Imports: nothing of exmyconv but ``errors``. Everything else builds on this floor.
"""
