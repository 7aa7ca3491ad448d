"""Benchmarks: GPU kernels against torch fp16/bf16 (``kernels``; ``peers``: vLLM's Humming beside them),
end-to-end decoding (``e2e``: the project's decoder; ``generate``: transformers ``generate()``), model quality
(``quality``: `exmyconv eval`, with its default text ``eval_text.txt``; ``compare``: `bench --quality`)
and the integer round-to-nearest baselines of that comparison (``baselines``).

Imports: any floor below; nothing imports it but the command line.
"""
