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
    out = {}
    for name, mean in _input_statistics(root, text_file, max_tokens, device, full=False).items():
        out[name] = mean + np.float32(1e-6) * max(float(mean.mean()), 1e-30)  # no zero weights
    return out


def activation_covariances(root: Path, text_file: str, max_tokens: int = 4096, device: str | None = None) -> dict:
    """{weight tensor name: float32 [K, K] second moments E[x xᵀ] of its inputs over calibration tokens}.
    Given to search.measure, the error is each layer's squared output error on the calibration text
    (scripts/auto-criteria compares it; the CLI's search uses activation_moments, docs/quality.md says
    why). The diagonal gets the same small floor as activation_moments."""
    out = {}
    for name, h in _input_statistics(root, text_file, max_tokens, device, full=True).items():
        h[np.diag_indices_from(h)] += np.float32(1e-6) * max(float(np.diagonal(h).mean()), 1e-30)
        out[name] = h
    return out


def _input_statistics(root: Path, text_file: str, max_tokens: int, device: str | None, full: bool) -> dict:
    """Run the model of ``root`` on the text's first ``max_tokens`` tokens, in windows of up to 512:
    layer_input_statistics of every nn.Linear."""
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
    windows = [ids[start:start + window] for start in range(0, len(ids), window)]
    return layer_input_statistics(model, windows, full)


def layer_input_statistics(model, windows: list, full: bool, names: list[str] | None = None) -> dict:
    """{weight name: float32 mean over tokens of x xᵀ [K, K] (``full``) or of x² [K]} of the inputs of
    every nn.Linear of ``model`` (or of the weights ``names``), running it on the token-id windows."""
    import torch

    if names is None:
        modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    else:
        modules = {}
        for name in names:
            module, _, leaf = name.rpartition(".")
            found = model.get_submodule(module) if module else None
            if not isinstance(found, torch.nn.Linear) or leaf != "weight":
                raise ExmyError(f"{name} is not the weight of an nn.Linear of the model")
            modules[module] = found
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            stat = x.double().T @ x.double() if full else x.float().square().sum(0)
            sums[name] = sums.get(name, 0) + stat
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for window in windows:
                model(input_ids=window[None].to(device))
    finally:
        for h in handles:
            h.remove()
    return {f"{name}.weight": (total / counts[name]).cpu().numpy().astype(np.float32) for name, total in sums.items()}


def match(moments: dict, names: list[str]) -> dict:
    """{checkpoint weight name: its moments} for every name in ``names``, or ExmyError naming those missed.

    The calibration model's layer names can differ from the checkpoint's in their leading parts: a
    config without ``architectures`` loads the base model (``layers.0...``) for a checkpoint that
    stores ``model.layers.0...``, a base-model prefix (``bert.``) may be there or not, a wrapper may
    rename it (``model.language_model.layers.0...`` against ``model.layers.0...``). A name matches
    exactly, else the one key sharing its longest dotted ending, when that ending holds the whole name
    from the part before its first number on (``layers.0``; without a number, all but the first part).
    """
    keys = [key.split(".") for key in moments]
    out, missed = {}, []
    for name in names:
        if name in moments:
            out[name] = moments[name]
            continue
        parts = name.split(".")
        shared = [_common_ending(parts, key) for key in keys]
        best = max(shared, default=0)
        first_number = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        start = 1 if first_number is None else max(first_number - 1, 0)
        if best >= max(len(parts) - start, 2) and shared.count(best) == 1:
            out[name] = moments[".".join(keys[shared.index(best)])]
        else:
            missed.append(name)
    if missed:
        raise ExmyError(f"--calibration: no activation statistics for {len(missed)} of {len(names)} quantized weights "
                        f"({', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''}): {_why(missed, moments)}; "
                        "keep them unquantized with --skip, or convert without --calibration")
    return out


def _common_ending(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _why(missed: list[str], moments: dict) -> str:
    """Why those weights have no statistics, one reason per kind of weight missed."""
    reasons = []
    if any("embed" in name for name in missed):
        reasons.append("an embedding's input is token ids, not activations an nn.Linear sees")
    if any(name.endswith("lm_head.weight") for name in missed) and not any("lm_head" in k for k in moments):
        reasons.append("the calibration model has no lm_head (transformers loaded a base model: config.json's "
                       "architectures is missing or names no class it knows)")
    if any("embed" not in name and not name.endswith("lm_head.weight") for name in missed) or not reasons:
        example = next(iter(moments), None)
        reasons.append("the calibration model has no nn.Linear of that name" +
                       (f" (its linear layers are named like {example})" if example else " (it has no nn.Linear)"))
    return "; ".join(reasons)
