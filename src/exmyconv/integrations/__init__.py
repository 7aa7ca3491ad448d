"""Other people's tools: transformers (``transformers``: the lazy registration; ``transformers_impl``: the
quantizer) and the Hugging Face Hub (``hub``: model card and upload). The next integrations go here.

Imports: any floor below (``format``, ``io``, ``cuda``, ``torch``, ``check``, ``convert``).
"""
