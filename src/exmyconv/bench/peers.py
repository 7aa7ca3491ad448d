"""Peer kernels for `exmyconv bench --peers`: vLLM's Humming (``pip install humming-kernels``).

Timed with the benchmark's own timer, shapes, batches and weight rotation, in the same run as ours.
Humming quantizes a float weight itself (round to nearest; one scale per output channel, int4 with
groups of 128) and compiles its kernels with nvcc on first use. Its weights come from random fp16
matrices (std 0.02): speed does not depend on the values, only on the bytes its format streams.
"""
from __future__ import annotations

# our format name -> Humming weight config for the same element format (channel scales)
SAME_FORMAT = {"e2m1": {"dtype": "float4e2m1"}, "e2m2": {"dtype": "float5e2m2"},
               "e3m2": {"dtype": "float6e3m2"}, "e2m3": {"dtype": "float6e2m3"}}
# other Humming formats people run, as extra columns
EXTRA = {"int4-g128": {"dtype": "int4", "group_size": 128}}


def unavailable_reason() -> str:
    """Why Humming cannot run here ("" when it can)."""
    try:
        import humming.layer  # noqa: F401
    except Exception as err:
        return f"humming is not importable ({type(err).__name__}: {err})"
    return ""


def version() -> str:
    try:
        from importlib.metadata import version as v

        return v("humming-kernels")
    except Exception:
        return "?"


class HummingWeights:
    """Copies of one Humming layer shape (rotated like ours), each holding different random weights."""

    def __init__(self, k: int, n: int, config: dict, copies_for, seed: int, dtype=None):
        import torch

        from humming.layer import HummingLayer

        dtype = dtype or torch.float16  # the activations' dtype

        gen = torch.Generator(device="cuda").manual_seed(seed)

        def layer():
            w = torch.randn(n, k, dtype=dtype, device="cuda", generator=gen) * 0.02
            lay = HummingLayer(shape_n=n, shape_k=k, weight_config=dict(config), torch_dtype=dtype).cuda()
            lay.load_from_unquantized(w)
            lay.transform()
            return lay

        first = layer()
        self.nbytes = sum(p.numel() * p.element_size() for name, p in first.named_parameters()
                          if "bias" not in name) or 1
        self.layers = [first] + [layer() for _ in range(copies_for(self.nbytes) - 1)]

    def launcher(self, x, y):
        """launch(i): y = x W_i^T with copy i (mod the number of copies)."""
        layers = self.layers
        return lambda i: layers[i % len(layers)](x, outputs=y)
