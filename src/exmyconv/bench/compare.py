"""`exmyconv bench --quality`: model quality against bits per weight, ExMy variants next to integer RTN.

On the CPU, for one model (a folder, ``@minilm`` or a Hub id) and the measures of ``exmyconv eval``
(:mod:`exmyconv.bench.quality`): the source runs once on the text and its outputs are kept; then each
variant is made and run on the same input.

- An ExMy variant (``e2m2``, ``e2m2s4-g128``, ``auto-5``, ``auto-5+cal``, ``auto-5-untied``) is converted as
  ``exmyconv quantize`` converts (``--format``, ``--group-size``, ``--bits``, ``--calibration``,
  ``--no-tie-fused``) into a
  scratch folder and loaded from there with ``from_pretrained``, as ``exmyconv eval`` loads it.
- An integer baseline (``int4-g128``: :mod:`exmyconv.bench.baselines`) replaces exactly the weights
  the converter quantizes by their round-to-nearest values, in a fresh copy of the source model.
- A peer (``nf4-b64``, ``hqq4-g64``, ``gptq4-g128``: :mod:`exmyconv.bench.peers_quality`) replaces them
  the same way by the weights the peer's checkpoint dequantizes to. The default list adds the peers
  that run here (GPTQ only with a calibration text, which is its calibration set).

bits/weight is over the quantized tensors, as stored: for ExMy payload, padding and scales (what the
converter reports); for intB-gG, B bits plus an fp16 scale and zero point per group; for a peer,
everything its checkpoint stores. ``bits_nominal`` is what the same ExMy choices would take without
the layout's padding of each row (to a multiple of 32 elements since layout 2.0; for NF4: without its per-tensor code
tables). A row is on the **frontier** when no other row has at most its bits and a better
metric (KL divergence for causal LMs, cosine for encoders).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..convert.calibration import layer_input_statistics, read_text_file
from ..convert.pipeline import Options, convert, plan
from ..convert.search import check_budget, parse_candidates
from ..errors import ExmyError
from ..format.exmy import get_format
from ..format.layout import nominal_bits as layout_nominal_bits
from ..io.source import open_source, resolve
from . import baselines, peers_quality, quality
from .kernels import git_commit

DEFAULT_VARIANTS = ("e2m1,e2m2s4,e2m2s4-g128,e2m1-g32,e2m2,e2m2-g128,e2m3s3,e3m2,e2m3,e4m3,"
                    "auto-4.25,auto-5,int4-g128,int4-g32,int5-g128")
DEFAULT_TOKENS = 2048  # the CPU runs every variant: half of eval's default
_AUTO = re.compile(r"auto-(\d+(?:\.\d+)?)(\+cal)?(-untied)?")
# per kind: (metric the frontier and plot use, higher is better, the table's metric columns)
METRICS = {"causal": ("kl_mean", False, (("perplexity", "perplexity", ".3f"), ("kl_mean", "KL mean", ".5f"),
                                         ("kl_p99", "KL p99", ".4f"), ("top1_agreement", "top-1 agree", ".4f"))),
           "encoder": ("cosine_mean", True, (("cosine_mean", "cos mean", ".5f"), ("cosine_min", "cos min", ".5f")))}


@dataclass(frozen=True)
class Variant:
    name: str
    options: dict | None = None  # pipeline Options fields (ExMy)
    scheme: baselines.IntScheme | None = None  # integer RTN baseline
    peer: peers_quality.Peer | None = None


def parse_variants(text: str | None, calibration: str | None = None) -> list[Variant]:
    """'e2m2,e2m2s4-g128,auto-5,auto-5+cal,int4-g128,nf4-b64' -> variants (default: DEFAULT_VARIANTS and
    the peers that run here, plus auto-5+cal when a calibration text is given)."""
    names = [n.strip() for n in (text or DEFAULT_VARIANTS).split(",") if n.strip()]
    if text is None:
        names += peers_quality.default_names(bool(calibration)) + (["auto-5+cal"] if calibration else [])
    out = []
    for name in names:
        auto = _AUTO.fullmatch(name)
        peer = peers_quality.parse(name)
        if peer:
            if peer.needs_calibration and not calibration:
                raise ExmyError(f"{name} needs --calibration TEXT_FILE (its calibration set)")
            out.append(Variant(name, peer=peer))
        elif name.startswith("int"):
            try:
                out.append(Variant(name, scheme=baselines.parse(name)))
            except ValueError as err:
                raise ExmyError(str(err)) from None
        elif auto:
            if auto[2] and not calibration:
                raise ExmyError(f"{name} needs --calibration TEXT_FILE")
            out.append(Variant(name, {"format": "auto", "bits": float(auto[1]),
                                      "calibration": calibration if auto[2] else None,
                                      **({"tie_fused": False} if auto[3] else {})}))
        else:
            fmt, _, group = name.partition("-g")
            get_format(fmt)
            if group and not group.isdigit():
                raise ExmyError(f"bad variant {name!r}: use FORMAT[-gGROUP], auto-BITS[+cal][-untied], intB[-gG], "
                                "nf4-b64, hqq4-gG or gptq4-gG")
            out.append(Variant(name, {"format": fmt, "group_size": int(group) if group else None}))
    if len({v.name for v in out}) != len(out):
        raise ExmyError("a variant is named twice")
    return out


def quantized_shapes(root: Path) -> dict[str, tuple[int, ...]]:
    """The tensors the converter quantizes with default options (the baselines take the same)."""
    source = open_source(str(root))
    try:
        return {item.info.name: tuple(item.info.shape) for item in plan(source, Options()) if item.record}
    finally:
        source.close()


def nominal_bits(formats: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> float:
    """bits/weight of these choices without the row padding: format bits (shared bit included) plus a
    16-bit scale per group."""
    bits = count = 0
    for name, choice in formats.items():
        fmt, _, group = choice.partition("-g")
        *lead, k = shapes[name]
        rows = int(np.prod(lead))
        bits += rows * k * layout_nominal_bits(get_format(fmt), k, int(group) if group else None)
        count += rows * k
    return bits / count


def refusal(variant: Variant, shapes: dict) -> str | None:
    """The converter's refusal of a too-small auto budget, found with its own rule before its minutes of
    measuring."""
    if not variant.options or variant.options["format"] != "auto":
        return None
    candidates = parse_candidates(None)
    sizes = [np.array([c.nbytes(shape) for c in candidates]) for shape in shapes.values()]
    weights = sum(int(np.prod(shape)) for shape in shapes.values())
    try:
        check_budget(sizes, variant.options["bits"] * weights / 8)
    except ExmyError as err:
        return str(err)
    return None


class Reference:
    """The source model's outputs on the text, computed once; measures a variant model against them."""

    def __init__(self, root: Path, config: dict, text: str, tokens: int, seq_len: int):
        self.kind = quality.model_kind(config)
        tokenizer = quality.load_tokenizer(root)
        self.seq_len = min(seq_len, quality.max_positions(config) or seq_len)
        model = quality.load_model(root, self.kind, "cpu")
        if self.kind == "causal":
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            self.windows = quality.token_windows(ids, tokens, self.seq_len)
            if not self.windows:
                raise ExmyError("the text has fewer than 2 tokens")
            self.logprobs = [quality.next_token_logprobs(model, w, "cpu")[0] for w in self.windows]
            nll = torch.cat([-lp.gather(1, w[1:, None])[:, 0] for lp, w in zip(self.logprobs, self.windows)])
            self.info = {"tokens": len(nll), "seq_len": self.seq_len,
                         "source_perplexity": float(torch.exp(nll.double().mean()))}
        else:
            self.batches, count, used = quality.sentence_batches(tokenizer, text, tokens, self.seq_len)
            self.embeddings = quality.embeddings(model, self.batches, "cpu")
            self.info = {"sentences": count, "tokens": used}

    def measure(self, model) -> dict:
        if self.kind == "causal":
            scores = quality.score_causal(model, self.windows, "cpu", self.logprobs)
            metrics = quality.causal_metrics(scores)
            del metrics["source_perplexity"]
            return metrics
        cos = quality.cosine(quality.embeddings(model, self.batches, "cpu"), self.embeddings)
        return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def exmy_row(variant: Variant, root: Path, kind: str, shapes: dict, scratch: Path, calibration_tokens: int):
    """Convert, load as users load it; (model, row fields)."""
    out = scratch / "variant"
    opts = Options(**{k: v for k, v in variant.options.items() if v is not None}, calibration_tokens=calibration_tokens)
    summary = convert(str(root), str(out), opts, overwrite=True, progress=False)
    if sorted(summary.formats) != sorted(shapes):
        raise ExmyError(f"{variant.name}: the converter quantized other tensors than the plan's")
    model = quality.load_model(out, kind, "cpu")
    shutil.rmtree(out)
    row = {"bits": summary.bits_per_weight, "bits_nominal": nominal_bits(summary.formats, shapes),
           "rel_weight_error": summary.mean_error}
    if variant.options["format"] == "auto":
        row["chosen"] = dict(Counter(summary.formats.values()).most_common())
    return model, row


def replaced_row(variant: Variant, root: Path, kind: str, shapes: dict, calibration: tuple | None = None):
    """The source model with the quantized tensors replaced by an integer baseline's or a peer's
    dequantized values; (model, row fields). ``calibration``: (text file, tokens, seq_len) for GPTQ."""
    model = quality.load_model(root, kind, "cpu")
    state = model.state_dict()
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ExmyError(f"{variant.name}: the model has no parameter {missing[0]} (its names differ from the "
                        "checkpoint's)")
    hessians = {}
    if variant.peer and variant.peer.needs_calibration:
        if not calibration or not calibration[0]:
            raise ExmyError(f"{variant.name} needs a calibration text (--calibration TEXT_FILE)")
        hessians = layer_input_statistics(model, calibration_windows(root, *calibration), full=True,
                                          names=list(shapes))
    bits = nominal = count = 0
    errors = []
    with torch.no_grad():
        for name, shape in shapes.items():
            weight = state[name].float().numpy()  # shares memory with the model when float32
            if variant.scheme:
                rounded = variant.scheme.fake_quantize(weight.reshape(-1, shape[-1])).reshape(shape)
                stored = stored_nominal = variant.scheme.storage_bits(shape)
            else:
                rounded, stored, stored_nominal = variant.peer.fake_quantize(name, weight, hessians.get(name))
            if not np.isfinite(rounded).all():
                raise ExmyError(f"{variant.name}: non-finite weights in {name}")
            errors.append(baselines.relative_error(weight, rounded))
            state[name].copy_(torch.from_numpy(np.ascontiguousarray(rounded, np.float32)))
            bits += stored
            nominal += stored_nominal
            count += int(np.prod(shape))
    row = {"bits": bits / count, "bits_nominal": nominal / count, "rel_weight_error": float(np.mean(errors))}
    if variant.peer:
        row["implementation"] = variant.peer.implementation()
    return model, row


def calibration_windows(root: Path, text_file: str, tokens: int, seq_len: int) -> list[torch.Tensor]:
    """The calibration text's first ``tokens`` tokens (no special tokens) in windows of seq_len, as the
    converter's --calibration reads it."""
    ids = quality.load_tokenizer(root)(read_text_file(text_file, "calibration text"),
                                       add_special_tokens=False)["input_ids"][:tokens]
    return [torch.tensor(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]


def mark_frontier(rows: list[dict], key: str, higher: bool) -> None:
    measured = [r for r in rows if key in r]
    for r in measured:
        better = (lambda o: o[key] > r[key]) if higher else (lambda o: o[key] < r[key])
        r["frontier"] = not any(o["bits"] <= r["bits"] and better(o) for o in measured if o is not r)


def run(model: str, variants: list[Variant], text_file: str | None = None, tokens: int = DEFAULT_TOKENS,
        seq_len: int = quality.DEFAULT_SEQ_LEN, calibration_tokens: int = 4096, calibration: str | None = None,
        log=print) -> dict:
    """Measure every variant; the JSON-ready result."""
    began = time.perf_counter()
    if tokens < 1 or seq_len < 2:
        raise ExmyError("--tokens must be at least 1 and --seq-len at least 2")
    root = resolve(model)
    config = quality.read_config(root)
    if quality.is_exmy(config):
        raise ExmyError(f"{model}: an exmy checkpoint; bench --quality converts the original model itself")
    text, label = quality.read_text(text_file)
    shapes = quantized_shapes(root)
    if not shapes:
        raise ExmyError(f"{model}: the converter would quantize no tensor")
    reference = Reference(root, config, text, tokens, seq_len)
    kind = reference.kind
    key, higher, _ = METRICS[kind]
    result = {"date": datetime.date.today().isoformat(), "commit": git_commit(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                         f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
              "model": model, "kind": kind, "architecture": (config.get("architectures") or [config.get("model_type")])[0],
              "text": label, **reference.info, "quantized_tensors": len(shapes),
              "quantized_weights": int(sum(np.prod(s) for s in shapes.values())), "metric": key, "rows": []}
    log(f"{model}: {kind}, {len(shapes)} quantized tensors, {len(variants)} variants on "
        + (f"{reference.info['tokens']} tokens" if kind == "causal" else f"{reference.info['sentences']} sentences")
        + f" of {label}")
    # quiet: calibration loads the model with transformers, whose bars would break up the log
    with tempfile.TemporaryDirectory(prefix="exmy-quality-") as scratch, quality.quiet_transformers():
        for variant in variants:
            started = time.perf_counter()
            refused = refusal(variant, shapes) or (variant.peer and variant.peer.unavailable())
            if refused:
                result["rows"].append({"variant": variant.name, "refused": refused})
                log(f"  {variant.name:<12} refused: {refused}")
                continue
            if variant.scheme or variant.peer:
                variant_model, row = replaced_row(variant, root, kind, shapes,
                                                  (calibration, calibration_tokens, reference.seq_len))
            else:
                variant_model, row = exmy_row(variant, root, kind, shapes, Path(scratch), calibration_tokens)
            row = {"variant": variant.name, **row, **reference.measure(variant_model),
                   "seconds": round(time.perf_counter() - started, 1)}
            result["rows"].append(row)
            log(f"  {variant.name:<12} {row['bits']:.3f} bits  {key} {row[key]:.5g}  ({row['seconds']} s)")
    mark_frontier(result["rows"], key, higher)
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


def table(result: dict) -> str:
    """Markdown table, rows by bits; '*' marks the frontier."""
    _, _, columns = METRICS[result["kind"]]
    head = ["variant", "bits/weight", "(nominal)", "rel. weight error", *(c[1] for c in columns)]
    lines = [f"{result['model']} ({result['architecture']}), {result['text']}: "
             + (f"{result['tokens']} tokens, source perplexity {result['source_perplexity']:.3f}"
                if result["kind"] == "causal" else f"{result['sentences']} sentences, cosine vs the source")
             + f"; {result['date']}, commit {result['commit'] or '?'}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    measured = sorted((r for r in result["rows"] if "bits" in r), key=lambda r: (r["bits"], r["variant"]))
    for r in measured:
        cells = [r["variant"] + (" *" if r["frontier"] else ""), f"{r['bits']:.3f}", f"{r['bits_nominal']:.3f}",
                 f"{r['rel_weight_error']:.4f}", *(format(r[c[0]], c[2]) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    for r in result["rows"]:
        if "refused" in r:
            lines.append(f"| {r['variant']} | refused: {r['refused']} |" + " |" * (len(head) - 2))
    lines.append("")
    lines.append("* on the frontier: no variant with at most these bits has a better "
                 + ("KL mean" if result["kind"] == "causal" else "cos mean"))
    chosen = [f"{r['variant']}: " + ", ".join(f"{f} x{n}" for f, n in r["chosen"].items())
              for r in measured if "chosen" in r]
    if chosen:
        lines.append("auto chose: " + "; ".join(chosen))
    peers = [f"{r['variant']}: {r['implementation']}" for r in measured if "implementation" in r]
    if peers:
        lines.append("peers (fake-quantized): " + "; ".join(peers))
    return "\n".join(lines)


def plot(result: dict, path: str) -> bool:
    """Quality against bits per weight, one point per variant (ExMy fixed, auto, integer RTN); False
    without matplotlib."""
    try:
        plt = quality.pyplot()
    except ExmyError:
        return False
    key, _, columns = METRICS[result["kind"]]
    panels = [c for c in columns if c[0] in (key, "perplexity")]
    rows = [r for r in result["rows"] if "bits" in r]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (metric, label, _) in zip(axes[0], panels):
        # cosines crowd below 1: their distance from 1, like KL, spreads out on a log axis
        value = (lambda r: 1 - r[metric]) if metric == "cosine_mean" else (lambda r: r[metric])
        for name, marker, pick in (("ExMy", "o", lambda r: not r["variant"].startswith(("auto", "int"))
                                    and "implementation" not in r),
                                   ("auto", "D", lambda r: r["variant"].startswith("auto")),
                                   ("integer RTN", "s", lambda r: r["variant"].startswith("int")),
                                   ("peers", "^", lambda r: "implementation" in r)):
            sub = [r for r in rows if pick(r)]
            ax.scatter([r["bits"] for r in sub], [value(r) for r in sub], marker=marker, label=name)
            for r in sub:
                ax.annotate(r["variant"], (r["bits"], value(r)), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if metric != "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight (stored, scales included)")
        ax.set_ylabel("1 - " + label if metric == "cosine_mean" else label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"exmyconv bench --quality: {Path(result['model']).name} ({result['architecture']}), {result['text']}, "
                 f"{result['date']}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(result: dict, json_path: str | None, png_path: str | None) -> list[str]:
    """The JSON and the plot (skipped without matplotlib); the paths written."""
    written = []
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
        written.append(json_path)
    if png_path and plot(result, png_path):
        written.append(png_path)
    return written
