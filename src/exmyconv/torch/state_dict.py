"""A converted checkpoint as a torch state dict (``exmyconv.load_state_dict``)."""
from __future__ import annotations

import numpy as np

from ..io.checkpoint import open_checkpoint

_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def load_state_dict(path: str, dtype=None) -> dict:
    """A converted checkpoint as a torch state dict with every quantized tensor dequantized.

    ``dtype``: torch dtype for dequantized tensors (default: each tensor's source dtype).
    Unquantized tensors keep their stored dtype.
    """
    import torch

    out = {}
    with open_checkpoint(path) as ckpt:
        for name in ckpt.names():
            if name in ckpt.records:
                record = ckpt.records[name][0]
                target = dtype or getattr(torch, _TORCH.get(record.dtype, "float32"))
                code = {torch.float16: "F16", torch.bfloat16: "BF16"}.get(target, "F32")
                values = ckpt.dequantize(name, code)
                out[name] = torch.from_numpy(values).to(target)
            else:
                info, f = ckpt.plain[name]
                stored = np.array(f.read(name))
                if info.dtype == "BF16":
                    out[name] = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
                else:
                    out[name] = torch.from_numpy(stored)
    return out
