"""Activation statistics for activation-aware errors (`--calibration TEXT_FILE`).

The source model runs (transformers, GPU if torch sees one, else CPU) on the text; every
nn.Linear records the mean square of each input channel, E[x_j^2]. The error of a quantized
weight is then Σ_j E[x_j^2]·‖ΔW[:, j]‖², the expected squared output error under independent
inputs — the diagonal of the usual second-order proxy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ExmyError


def load_model(root: Path):
    """The model class named in config.json (so parameter names match the checkpoint), eval mode."""
    try:
        import torch
        import transformers
    except ImportError as err:
        raise ExmyError(f"--calibration needs torch and transformers ({err.name} is missing)") from None
    from transformers.utils import logging as hf_logging

    config = transformers.AutoConfig.from_pretrained(root)
    classes = [getattr(transformers, name, None) for name in (config.architectures or [])]
    model_class = next((c for c in classes if c is not None), transformers.AutoModel)
    # transformers' loading report and progress bar would bury our own output (and error line)
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = model_class.from_pretrained(root, torch_dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    return model.eval()


def read_text_file(path: str, what: str) -> str:
    """A non-empty UTF-8 text file (undecodable bytes replaced), or ExmyError naming ``what`` it is."""
    file = Path(path)
    if not file.is_file():
        raise ExmyError(f"{path}: no such {what} file")
    text = file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ExmyError(f"{path}: {what} is empty")
    return text


def activation_moments(root: Path, text_file: str, max_tokens: int = 4096, device: str | None = None) -> dict:
    """{weight tensor name: float32 [K] mean of x_j^2 over calibration tokens}."""
    import torch

    text = read_text_file(text_file, "calibration text")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(root)
        model = load_model(root)
    except (OSError, ValueError) as err:
        raise ExmyError(f"{root}: cannot load the model for calibration ({str(err).splitlines()[0]})") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    window = min(512, getattr(model.config, "max_position_embeddings", 512) or 512)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for start in range(0, len(ids), window):
                model(input_ids=ids[start:start + window][None].to(device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, total in sums.items():
        mean = (total / counts[name]).cpu().numpy().astype(np.float32)
        out[f"{name}.weight"] = mean + np.float32(1e-6) * max(float(mean.mean()), 1e-30)  # no zero weights
    return out


def match(moments: dict, names: list[str]) -> dict:
    """{checkpoint weight name: its moments} for every name in ``names``, or ExmyError naming those missed.

    The calibration model's layer names can differ from the checkpoint's by a leading prefix: a
    config without ``architectures`` loads the base model (``layers.0...``) for a checkpoint that
    stores ``model.layers.0...``, and the other way round. A name matches exactly, else the one
    moments key that equals it up to such a prefix.
    """
    out, missed = {}, []
    for name in names:
        if name in moments:
            out[name] = moments[name]
            continue
        near = [key for key in moments if name.endswith("." + key) or key.endswith("." + name)]
        if len(near) == 1:
            out[name] = moments[near[0]]
        else:
            missed.append(name)
    if missed:
        raise ExmyError(f"--calibration: no activation statistics for {len(missed)} of {len(names)} quantized weights "
                        f"(e.g. {', '.join(missed[:3])}): the calibration model has no nn.Linear of that name; "
                        "keep them unquantized with --skip, or convert without --calibration")
    return out
