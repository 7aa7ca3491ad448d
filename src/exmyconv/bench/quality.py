"""`exmyconv eval`: what a conversion costs, measured on text through the loading path users use.

The converted folder loads with transformers' ``from_pretrained`` (exmyconv's quantizer registered,
docs/transformers.md); the source, when given, is the original model, run on the same tokens. Both
compute in float32. The kind of model comes from config.json:

- **causal LM** (an architecture ``...ForCausalLM`` / ``...LMHeadModel``; without architectures,
  a model type transformers has a causal LM head for and no masked LM head): the text, tokenized
  without special tokens, is cut into consecutive windows of ``seq_len`` tokens; each window
  predicts its tokens 2..L from those before it, until ``tokens`` tokens are scored. Perplexity =
  exp(mean negative log-likelihood). With a source, per token: KL(source || converted) of the two
  next-token distributions (nats) and whether their top-1 tokens agree.
- **encoder** (anything else, e.g. MiniLM's BertModel): the text's sentences, until ``tokens``
  tokens; per sentence the cosine similarity of the mean-pooled last hidden states of converted
  and source (a source is needed).

The default text (``eval_text.txt`` next to this module) is English prose written for this project.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..convert.calibration import read_text_file
from ..cuda.device import torch_cuda_reason
from ..errors import ExmyError
from ..format.layout import CONFIG_FILE, GUARD_KEY, GUARD_VALUE, QUANT_METHOD
from ..io.validate import read_json
from ..io.source import resolve

TEXT = Path(__file__).with_name("eval_text.txt")
DEFAULT_TOKENS = 4096
DEFAULT_SEQ_LEN = 512
BATCH = 256  # sentences per encoder forward (each forward of a converted model decodes all its weights)
_CAUSAL = ("ForCausalLM", "LMHeadModel")
_BOOKKEEPING = {"quantization_config", "transformers_version", "_name_or_path"}  # may differ after converting


@dataclass
class Evaluation:
    summary: dict  # what `exmyconv eval --json` prints
    per_item: np.ndarray | None  # KL per token (causal, with a source) or cosine per sentence (encoder)


# --------------------------------------------------------------------------- inputs


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise ExmyError("eval needs transformers: pip install 'transformers>=5'") from None
    return transformers


def read_config(root: Path) -> dict:
    if not (root / CONFIG_FILE).is_file():
        raise ExmyError(f"{root}: no {CONFIG_FILE} (eval needs a transformers model folder)")
    return read_json(root / CONFIG_FILE)


def is_exmy(config: dict) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def model_kind(config: dict) -> str:
    """'causal' or 'encoder', from config.json."""
    if config.get("is_encoder_decoder"):
        raise ExmyError(f"eval does not support encoder-decoder models ({config.get('model_type')})")
    archs = config.get("architectures") or []
    if archs:
        return "causal" if any(a.endswith(_CAUSAL) for a in archs) else "encoder"
    # architectures null: transformers' own tables, by model type (bert has both heads: an encoder)
    from transformers.models.auto import modeling_auto as auto

    kind = config.get("model_type")
    causal = kind in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "causal" if causal else "encoder"


def check_same_model(config: dict, source_config: dict) -> None:
    """The source must be the model the conversion read: config.json equal but for bookkeeping."""
    a = {k: v for k, v in config.items() if k not in _BOOKKEEPING and not (k == GUARD_KEY and v == GUARD_VALUE)}
    b = {k: v for k, v in source_config.items() if k not in _BOOKKEEPING}
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
        raise ExmyError(f"the source's config.json differs from the converted model's in {', '.join(differ[:4])}"
                        f"{' ...' if len(differ) > 4 else ''}: --source must be the model it was converted from")


def read_text(path: str | None) -> tuple[str, str]:
    """(text, label): a UTF-8 file, or the default text that ships with exmyconv."""
    if path is None:
        return TEXT.read_text(encoding="utf-8"), "the default text"
    return read_text_file(path, "text"), Path(path).name


def pick_device(device: str | None) -> str:
    if device is None:
        return "cpu" if torch_cuda_reason() else "cuda"
    if device not in ("cpu", "cuda"):
        raise ExmyError(f"unknown device {device!r}: use cpu or cuda")
    if device == "cuda" and torch_cuda_reason():
        raise ExmyError(f"--device cuda: {torch_cuda_reason()}")
    return device


@contextlib.contextmanager
def quiet_transformers():
    """transformers' loading bars and notes off (the eval bar is ours)."""
    logging = transformers_module().utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_tokenizer(root: Path):
    transformers = transformers_module()
    try:
        with quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(str(root))
    except (OSError, ValueError) as err:
        raise ExmyError(f"{root}: no usable tokenizer ({str(err).splitlines()[0]})") from None


def load_model(root: Path, kind: str, device: str):
    """The model as users load it: from_pretrained, with exmyconv's quantizer for an exmy folder."""
    transformers = transformers_module()
    from ..integrations.transformers import register

    register()
    auto = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
    try:
        with quiet_transformers():
            model = auto.from_pretrained(str(root), dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ExmyError(f"{root}: transformers cannot load it ({str(err).splitlines()[0]})") from None
    return model.to(device).eval()


def max_positions(config: dict) -> int | None:
    return config.get("max_position_embeddings") or config.get("n_positions")


def _disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # None: tqdm shows it on a terminal only


# --------------------------------------------------------------------------- causal LMs


def token_windows(ids: list[int], tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Consecutive windows of seq_len tokens (the last may be shorter), together scoring `tokens` tokens
    (fewer if the text ends first): a window of L tokens scores L - 1."""
    windows, scored = [], 0
    for start in range(0, len(ids), seq_len):
        window = ids[start:start + min(seq_len, tokens - scored + 1)]
        if len(window) < 2 or scored >= tokens:
            break
        windows.append(torch.tensor(window))
        scored += len(window) - 1
    return windows


def next_token_logprobs(model, window: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 log-probabilities [L-1, V] of each next token, the tokens that came [L-1])."""
    window = window.to(device)
    with torch.no_grad():
        logits = model(input_ids=window[None]).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1), window[1:]


def score_causal(model, windows, device: str, reference=None, progress: bool | None = None) -> dict:
    """Per scored token: 'nll' (nats); with `reference`, an iterable of the source's log-probabilities
    per window (a generator runs the source in step, a list is a cache), also 'source_nll', 'kl'
    (KL(source || model), nats) and 'agree' (1 where both top-1 tokens are the same)."""
    parts: dict[str, list] = {"nll": []}
    references = iter(reference) if reference is not None else None
    for window in tqdm(windows, desc="eval", unit="window", disable=_disabled(progress), leave=False):
        logprobs, target = next_token_logprobs(model, window, device)
        parts["nll"].append(-logprobs.gather(1, target[:, None])[:, 0])
        if references is not None:
            ref = next(references).to(logprobs.device)
            kl = torch.nn.functional.kl_div(logprobs, ref, reduction="none", log_target=True).sum(-1)
            # KL >= 0; float32 rounding can leave a near-zero one a hair below
            parts.setdefault("kl", []).append(kl.clamp_min(0))
            parts.setdefault("source_nll", []).append(-ref.gather(1, target[:, None])[:, 0])
            parts.setdefault("agree", []).append((ref.argmax(-1) == logprobs.argmax(-1)).float())
    return {key: torch.cat(values).double().cpu().numpy() for key, values in parts.items()}


def causal_metrics(scores: dict) -> dict:
    out = {"perplexity": float(np.exp(scores["nll"].mean()))}
    if "kl" in scores:
        kl = scores["kl"]
        out.update(source_perplexity=float(np.exp(scores["source_nll"].mean())), kl_mean=float(kl.mean()),
                   kl_median=float(np.median(kl)), kl_p99=float(np.quantile(kl, 0.99)),
                   top1_agreement=float(scores["agree"].mean()))
    return out


# --------------------------------------------------------------------------- encoders


def sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if p.strip()]


def sentence_batches(tokenizer, text: str, tokens: int, seq_len: int) -> tuple[list[dict], int, int]:
    """(padded batches of the text's first sentences, sentences, tokens) while the tokens (special ones
    included) stay within `tokens`; at least one sentence."""
    chosen, used = [], 0
    for sentence in sentences(text):
        n = len(tokenizer(sentence, truncation=True, max_length=seq_len)["input_ids"])
        if chosen and used + n > tokens:
            break
        chosen.append(sentence)
        used += n
    batches = [tokenizer(chosen[i:i + BATCH], padding=True, truncation=True, max_length=seq_len,
                         return_tensors="pt") for i in range(0, len(chosen), BATCH)]
    return batches, len(chosen), used


def embeddings(model, batches: list, device: str, progress: bool | None = None, desc: str = "eval") -> torch.Tensor:
    """Mean-pooled last hidden state per sentence, float64 [sentences, hidden]."""
    out = []
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=_disabled(progress), leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1)).double().cpu())
    return torch.cat(out)


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per row, float64: a·b / sqrt(|a|²|b|²). For identical rows that is exactly 1 (the square root of a
    correctly rounded square is exact), which torch's cosine_similarity does not promise."""
    dot = (a * b).sum(-1)
    norms = ((a * a).sum(-1) * (b * b).sum(-1)).sqrt()
    return (dot / norms.clamp_min(torch.finfo(torch.float64).tiny)).clamp(-1, 1).numpy()


# --------------------------------------------------------------------------- exmyconv eval


def evaluate(converted: str, source: str | None = None, text_file: str | None = None, tokens: int = DEFAULT_TOKENS,
             seq_len: int = DEFAULT_SEQ_LEN, device: str | None = None, progress: bool | None = None) -> Evaluation:
    """Run CONVERTED (and SOURCE on the same input) and measure the difference; see the module docstring."""
    began = time.perf_counter()
    if tokens < 1 or seq_len < 2:
        raise ExmyError("--tokens must be at least 1 and --seq-len at least 2")
    root = resolve(converted)
    config = read_config(root)
    if not is_exmy(config):
        raise ExmyError(f"{converted}: not an exmy checkpoint (its config.json has no exmy quantization_config); "
                        "eval measures a converted folder, with the original model as --source")
    kind = model_kind(config)
    source_root = None
    if source is not None:
        source_root = resolve(source)
        source_config = read_config(source_root)
        if is_exmy(source_config):
            raise ExmyError(f"{source}: an exmy checkpoint; --source must be the original model")
        check_same_model(config, source_config)
    elif kind == "encoder":
        raise ExmyError(f"{converted} is an encoder ({', '.join(config.get('architectures') or [kind])}): "
                        "eval compares its embeddings with the source's, so it needs --source")
    device = pick_device(device)
    text, label = read_text(text_file)
    seq_len = min(seq_len, max_positions(config) or seq_len)
    tokenizer = load_tokenizer(root)
    source_tokenizer = load_tokenizer(source_root) if source_root else None
    summary = {"model": converted, "source": source, "kind": kind,
               "architecture": (config.get("architectures") or [config.get("model_type")])[0],
               "text": label, "device": device, "dtype": "float32"}
    if kind == "causal":
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if source_tokenizer is not None and source_tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
            raise ExmyError("the source's tokenizer splits the text differently: --source must be the model "
                            "it was converted from")
        windows = token_windows(ids, tokens, seq_len)
        if not windows:
            raise ExmyError(f"{label}: fewer than 2 tokens")
        model = load_model(root, kind, device)
        reference = None
        if source_root is not None:
            source_model = load_model(source_root, kind, device)
            reference = (next_token_logprobs(source_model, w, device)[0] for w in windows)
        scores = score_causal(model, windows, device, reference, progress)
        summary.update(tokens=len(scores["nll"]), windows=len(windows), seq_len=seq_len, **causal_metrics(scores))
        per_item = scores.get("kl")
    else:
        batches, count, used = sentence_batches(tokenizer, text, tokens, seq_len)
        theirs, _, _ = sentence_batches(source_tokenizer, text, tokens, seq_len)
        if any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, theirs)):
            raise ExmyError("the source's tokenizer splits the text differently: --source must be the model "
                            "it was converted from")
        mine = embeddings(load_model(root, kind, device), batches, device, progress, "converted")
        ref = embeddings(load_model(source_root, kind, device), batches, device, progress, "source")
        per_item = cosine(mine, ref)
        summary.update(sentences=count, tokens=used, cosine_mean=float(per_item.mean()),
                       cosine_min=float(per_item.min()))
    summary["seconds"] = round(time.perf_counter() - began, 2)
    return Evaluation(summary, per_item)


def report(summary: dict) -> str:
    """What `exmyconv eval` prints without --json."""
    s = summary
    if s["kind"] == "encoder":
        head = f"{s['architecture']} (encoder), {s['sentences']} sentences ({s['tokens']} tokens) of {s['text']}"
        body = [f"  cosine similarity to the source: mean {s['cosine_mean']:.5f}, min {s['cosine_min']:.5f}"]
    else:
        head = (f"{s['architecture']} (causal LM), {s['tokens']} tokens of {s['text']} "
                f"in {s['windows']} window(s) of up to {s['seq_len']}")
        ppl = f"  perplexity       {s['perplexity']:.4f}"
        if "kl_mean" in s:
            change = 100 * (s["perplexity"] / s["source_perplexity"] - 1)
            body = [f"{ppl}   (source {s['source_perplexity']:.4f}, {change:+.2f} %)",
                    f"  KL divergence    mean {s['kl_mean']:.5f}, median {s['kl_median']:.5f}, "
                    f"p99 {s['kl_p99']:.5f} nats/token",
                    f"  top-1 agreement  {100 * s['top1_agreement']:.2f} %"]
        else:
            body = [ppl + "   (no --source: no KL divergence)"]
    return "\n".join([f"{head}; {s['device']}, {s['dtype']}, {s['seconds']:.1f} s", *body])


def pyplot():
    """matplotlib's pyplot (Agg), or one clear error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ExmyError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot(evaluation: Evaluation, path: str) -> None:
    """Histogram of the per-token KL divergence (causal) or of 1 - cosine per sentence (encoder),
    on a log axis, with the mean, median and 99th percentile marked."""
    plt = pyplot()
    s = evaluation.summary
    causal = s["kind"] == "causal"
    values = evaluation.per_item if causal else 1 - evaluation.per_item
    what = "KL(source || converted) per token, nats" if causal else "1 - cosine similarity per sentence"
    positive = values[values > 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    if positive.size and positive.max() > 10 * positive.min():  # spans decades: a log axis
        ax.hist(positive, bins=np.geomspace(positive.min(), positive.max(), 60), color="tab:blue")
        ax.set_xscale("log")
    else:
        ax.hist(values, bins=60, color="tab:blue")
    log = ax.get_xscale() == "log"
    for q, style, name in ((np.mean(values), "-", "mean"), (np.median(values), "--", "median"),
                           (np.quantile(values, 0.99), ":", "p99")):
        if q > 0 or not log:
            ax.axvline(q, color="black", linestyle=style, label=f"{name} {q:.3g}")
    zeros = values.size - positive.size
    ax.set_xlabel(what + (f" ({zeros} of {values.size} are 0, not drawn)" if zeros and log else ""))
    ax.set_ylabel("tokens" if causal else "sentences")
    ax.set_title(f"exmyconv eval {Path(s['model']).name} vs {Path(s['source']).name}: {s['text']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
