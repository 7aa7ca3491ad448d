"""Other people's tools: transformers (``transformers``: the lazy registration; ``transformers_impl``: the
quantizer), vLLM (``vllm``: the plugin entry point; ``vllm_impl``: the quantization config;
``vllm_layers``: the layer methods) and the Hugging Face Hub (``hub``: model card and upload). The next
integrations go here.

Imports: any floor below (``format``, ``io``, ``cuda``, ``torch``, ``check``, ``convert``).
"""
