"""`exmyconv bench --e2e SPEC --generate`: transformers ``generate()`` itself, bf16 against ExMy.

What a user gets who loads a converted folder with ``from_pretrained(..., dtype=torch.bfloat16,
device_map="cuda")`` and calls ``generate()``: greedy decoding of ``tokens`` new tokens after a
16-token prompt (random token ids; ``min_new_tokens`` keeps every run the same length), timed

- **eager**: ``generate()`` as it comes (dynamic KV cache, every op launched from Python);
- **compiled**: ``generate(..., cache_implementation="static")``, transformers' documented fast path:
  it compiles the decode step with torch.compile (mode "reduce-overhead": CUDA graphs) on its own.

SPEC is a preset of :mod:`exmyconv.bench.e2e` (``llama3-8b``; ``qwen3-moe``: Qwen3-30B-A3B's shapes, whose
experts load as :class:`exmyconv.torch.experts.ExmyExperts`), a transformers config.json or a
folder with one (any causal LM transformers builds, MoE included), ``--layers`` shrinking it: the
model gets random bf16 weights, is saved, and each ExMy variant is converted from that folder with
the same pipeline as ``exmyconv quantize`` (default options). SPEC may also be a model folder with
weights (used as the bf16 source) or a converted exmy folder (its ``exmyconv dequantize`` output in
bf16 is then the reference).

Every variant is loaded at once (the GPU memory each load added is reported; where they do not fit
together, one at a time, each timed alone, the speedup then from the medians); per batch and mode
each is warmed up (compiled: twice, compilation then graph recording), then ``runs`` rounds time one
``generate()`` of each variant in turn (a machine whose speed drifts slows them alike): tokens per
second from the median over the rounds, counting every sequence (batch x tokens / seconds; prompt
processing included), and the speedup over bf16 as the median of the per-round ratios. What
torch.compile did during the timed calls is recorded with them (all zero: every compiled call was
replayed from the graph recorded in warm-up). Every
variant loads with ``use_kernels=False`` (transformers >= 5.2x would otherwise fetch Hub kernels for
some layers, which needs the network and would change the bf16 baseline, not the ExMy layers).

Tokens: for each ExMy variant the eager fast path (fused GEMV) and the compiled path are compared
with the bit-exact reference path (the same loaded model with ``ExmyLinear.gpu_kernels = False`` and
``ExmyExperts.gpu_kernels = False``:
exact dequantization, then the same ``F.linear`` as the bf16 model), each generating with its own
logits recorded. The GEMV sums in float32 in another order than cuBLAS, so logits differ by
rounding noise; a sequence that differs is a *tie* when, at its first differing step (where both
paths have seen the same tokens), the reference's margin between its own token and the fast path's
token is no larger than the largest difference between the two paths' logits at that step.
Anything else is a *mismatch*.
"""
from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

from ..errors import ExmyError
from ..format.exmy import get_format
from ..format.layout import CONFIG_FILE
from ..io.validate import read_json

BF16 = "bf16"
DEFAULT_FORMATS = ("e2m2",)
DEFAULT_BATCHES = (1, 4, 16)
DEFAULT_TOKENS = 64
ROUNDS = 5  # timed generate() calls per variant, mode and batch (in turns)
HEADROOM = 1.3  # GPU memory to hold loaded weights, per byte of them (caches, graphs: load_groups)
PROMPT = 16
MODES = ("eager", "compiled")


def parse_variants(text: str | None) -> list[str]:
    """'e2m2,e2m2s4' -> ['bf16', 'e2m2', 'e2m2s4'] (bf16 first, always)."""
    names = [t.strip().lower() for t in (text or ",".join(DEFAULT_FORMATS)).split(",") if t.strip()]
    out = [BF16]
    for name in names:
        if name in (BF16, "fp16"):
            continue
        out.append(get_format(name).name)
    return list(dict.fromkeys(out))


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ExmyError("bench --generate needs transformers: pip install 'transformers>=5'") from None
    return transformers


def _preset_config(spec: str, layers: int | None):
    """A transformers config for a preset of bench.e2e (a LlamaConfig for a DecoderConfig)."""
    from . import e2e

    preset = e2e.PRESETS[spec]
    if isinstance(preset, dict):
        fields = dict(preset)
        if layers is not None:
            if layers < 1:
                raise ExmyError(f"--layers must be at least 1, got {layers}")
            fields["num_hidden_layers"] = int(layers)
        return _transformers().AutoConfig.for_model(fields.pop("model_type"), **fields)
    cfg = e2e.build_config(spec, layers)
    return _transformers().LlamaConfig(
        hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, vocab_size=cfg.vocab,
        head_dim=cfg.hd, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps, max_position_embeddings=8192,
        tie_word_embeddings=False)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def prepare(spec: str, variants: list[str], layers: int | None, work: Path, log=print) -> dict[str, Path]:
    """{variant: model folder}: the bf16 source and one conversion per ExMy variant."""
    import torch

    from ..bench.quality import is_exmy

    transformers = _transformers()
    path = Path(spec)
    folder = path if path.is_dir() else path.parent
    if spec not in _presets() and not (folder / CONFIG_FILE).is_file():
        raise ExmyError(f"--e2e {spec!r}: not a preset ({', '.join(_presets())}) nor a config.json or a folder with one")
    config = None if spec in _presets() else read_json(folder / CONFIG_FILE)
    if config is not None and is_exmy(config):
        from ..convert.dequantize import dequantize_checkpoint

        fmt = (config.get("quantization_config") or {}).get("format", "exmy")
        log(f"dequantizing {folder} to bf16 (the reference)")
        dequantize_checkpoint(str(folder), str(work / BF16), dtype="bfloat16", progress=False)
        return {BF16: work / BF16, str(fmt): folder}
    if config is not None and path.is_dir() and _has_weights(folder) and layers is None:
        source = folder
    else:
        if spec in _presets():
            cfg = _preset_config(spec, layers)
        else:
            cfg = transformers.AutoConfig.from_pretrained(str(folder))
            if layers is not None:
                cfg.num_hidden_layers = int(layers)
        log(f"building a random-weight {type(cfg).__name__} ({cfg.num_hidden_layers} layers) in bf16")
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        source = work / BF16
        model.save_pretrained(str(source))
        del model
        _free()
    folders = {BF16: source}
    from ..convert.pipeline import Options, convert

    for name in variants:
        if name == BF16:
            continue
        began = time.perf_counter()
        convert(str(source), str(work / name), Options(format=name), progress=False)
        log(f"converted to {name} in {time.perf_counter() - began:.0f} s")
        folders[name] = work / name
    return folders


def _presets():
    from .e2e import PRESETS

    return PRESETS


def _free():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load(folder: Path):
    import torch

    from ..integrations.transformers import register
    from .quality import quiet_transformers

    register()
    with quiet_transformers():
        model = _transformers().AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16,
                                                                    device_map="cuda", use_kernels=False)
    return model.eval()


def _generate(model, ids, tokens: int, compiled: bool, logits: bool = False):
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    if logits:
        kwargs.update(return_dict_in_generate=True, output_logits=True)
    if compiled:
        kwargs["cache_implementation"] = "static"
    else:
        kwargs["disable_compile"] = True
    return model.generate(ids, attention_mask=ids.new_ones(ids.shape), **kwargs)


def _seconds(fn, device: str = "cuda") -> float:
    """Wall time of one call of ``fn``, the GPU's queue drained before and after."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    began = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - began


def compare_tokens(fast, reference, prompt: int) -> dict:
    """Sequences equal to the reference, ties within float noise, and mismatches (module docstring).

    ``fast`` and ``reference`` are generate() outputs with ``output_logits``: each path's own logits
    at every step, so at the first differing step both have seen the same tokens."""
    result = {"equal": 0, "ties": 0, "mismatches": 0}
    for row in range(fast.sequences.shape[0]):
        differ = (fast.sequences[row, prompt:] != reference.sequences[row, prompt:]).nonzero()
        if not len(differ):
            result["equal"] += 1
            continue
        step = int(differ[0])
        mine, theirs = fast.logits[step][row].float(), reference.logits[step][row].float()
        got, want = fast.sequences[row, prompt + step], reference.sequences[row, prompt + step]
        margin = float(theirs[want] - theirs[got])
        noise = float((mine - theirs).abs().max())
        result["ties" if margin <= noise else "mismatches"] += 1
        result.setdefault("first_difference", []).append({"row": row, "step": step, "margin": margin, "noise": noise})
    return result


def load_all(folders: dict[str, Path], log=print) -> dict[str, tuple]:
    """{variant: (model, facts)}, every variant loaded at once (so that they can be timed in turns);
    facts: load time, the GPU memory the load added, the ExMy modules it made."""
    import torch

    from ..torch.experts import ExmyExperts
    from ..torch.linear import ExmyLinear

    models = {}
    for variant, folder in folders.items():
        _free()
        before, began = torch.cuda.memory_allocated(), time.perf_counter()
        model = _load(folder)
        models[variant] = (model, {
            "variant": variant, "load_s": round(time.perf_counter() - began, 1),
            "memory_gb": round((torch.cuda.memory_allocated() - before) / 1e9, 3),
            "exmy_layers": sum(isinstance(m, ExmyLinear) for m in model.modules()),
            "exmy_experts": sum(isinstance(m, ExmyExperts) for m in model.modules())})
        log(f"loaded {variant}: {models[variant][1]['memory_gb']:.2f} GB in {models[variant][1]['load_s']} s")
    return models


def _reference(model, facts: dict, ids, tokens: int):
    """The bit-exact path's generate() with its logits (ExMy variants only; None for bf16)."""
    from ..torch.experts import ExmyExperts
    from ..torch.linear import ExmyLinear

    if not (facts["exmy_layers"] or facts["exmy_experts"]):
        return None
    ExmyLinear.gpu_kernels = ExmyExperts.gpu_kernels = False
    try:
        return _generate(model, ids, tokens, compiled=False, logits=True)
    finally:
        ExmyLinear.gpu_kernels = ExmyExperts.gpu_kernels = True


def compile_activity() -> dict:
    """What torch.compile did since its counters were cleared: all zero when every compiled call was
    replayed from the CUDA graph recorded in warm-up (what the compiled figures must be)."""
    import torch

    c = torch._dynamo.utils.counters
    return {"graphs": c["stats"].get("unique_graphs", 0), "breaks": sum(c["graph_break"].values()),
            "recompiles": sum(c["recompiles"].values()),
            "cudagraph_recordings": c["inductor"].get("cudagraph_recorded_non_static_inputs", 0)}


def measure(models: dict[str, tuple], batches: list[int], tokens: int, runs: int, vocab: int, log=print,
            modes=MODES, device: str = "cuda") -> list[dict]:
    """Rows per (mode, batch, variant). Per batch and mode every model is warmed up (compiled: twice,
    compilation then graph recording), then ``runs`` rounds time one generate() of each model in
    turn, so that a machine whose speed drifts slows every variant alike: ``seconds`` is the median
    over the rounds and ``vs_bf16`` the median of the per-round ratios (bf16's time / the variant's)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(1)
    rows = []
    with torch.no_grad():
        for batch in batches:
            torch._dynamo.reset()  # a fresh compile per batch: dynamo's recompile limit counts (model, batch) pairs
            ids = torch.randint(0, vocab, (batch, PROMPT), generator=gen).to(device)
            refs = {name: _reference(model, facts, ids, tokens) for name, (model, facts) in models.items()}
            for mode in modes:
                compiled = mode == "compiled"
                for model, _ in models.values():
                    for _ in range(2 if compiled else 1):
                        _generate(model, ids, tokens, compiled)
                torch._dynamo.utils.counters.clear()
                rounds = [{name: _seconds(lambda: _generate(model, ids, tokens, compiled), device)
                           for name, (model, _) in models.items()} for _ in range(runs)]
                activity = compile_activity()
                for name, (model, _) in models.items():
                    times = [r[name] for r in rounds]
                    seconds = statistics.median(times)
                    row = {"variant": name, "mode": mode, "batch": batch, "seconds": round(seconds, 4),
                           "range_s": [round(min(times), 4), round(max(times), 4)],
                           "tokens_per_s": round(batch * tokens / seconds, 1), "compile_activity": activity}
                    if BF16 in models:
                        row["vs_bf16"] = round(statistics.median(r[BF16] / r[name] for r in rounds), 3)
                    if refs[name] is not None:
                        row["tokens"] = compare_tokens(_generate(model, ids, tokens, compiled, logits=True),
                                                       refs[name], PROMPT)
                    rows.append(row)
                    log(f"{name:>7} {mode:>8} batch {batch:>2}: {row['tokens_per_s']:8.1f} tokens/s"
                        + (f" ({row['vs_bf16']:.2f}x bf16)" if "vs_bf16" in row and name != BF16 else "")
                        + (f"  tokens {row['tokens']}" if "tokens" in row else ""))
                log(f"batch {batch:>2} {mode}: torch.compile during the timed calls: {activity}")
    return rows


def load_groups(folders: dict[str, Path], free_bytes: int) -> list[dict[str, Path]]:
    """The variants loaded together: all of them when their weights (the folders' safetensors bytes,
    with room for caches and compiled graphs: x HEADROOM) fit in ``free_bytes`` of GPU memory, so that
    they are timed in turns; else one at a time (each measured alone, the speedup from the medians)."""
    need = sum(f.stat().st_size for folder in folders.values() for f in folder.glob("*.safetensors"))
    return [folders] if need * HEADROOM <= free_bytes else [{name: folder} for name, folder in folders.items()]


def with_ratios(rows: list[dict]) -> list[dict]:
    """Rows measured alone get ``vs_bf16`` from the medians: bf16's seconds / the variant's."""
    base = {(r["mode"], r["batch"]): r["seconds"] for r in rows if r["variant"] == BF16}
    for r in rows:
        if "vs_bf16" not in r and (r["mode"], r["batch"]) in base:
            r["vs_bf16"] = round(base[(r["mode"], r["batch"])] / r["seconds"], 3)
    return rows


def run(spec: str, variants: list[str], batches: list[int], layers: int | None = None,
        tokens: int = DEFAULT_TOKENS, runs: int = ROUNDS, work: str | None = None, log=print) -> dict:
    import torch

    from ..cuda.device import device_info

    with tempfile.TemporaryDirectory(prefix="exmyconv-generate-", dir=work) as tmp:
        folders = prepare(spec, variants, layers, Path(tmp), log=log)
        vocab = int(read_json(folders[BF16] / CONFIG_FILE).get("vocab_size") or 32000)
        torch.cuda.reset_peak_memory_stats()
        groups = load_groups(folders, torch.cuda.mem_get_info()[0])
        if len(groups) > 1:
            log("the variants do not fit in GPU memory together: each is measured alone, not in turns")
        rows, facts = [], {}
        for group in groups:
            models = load_all(group, log=log)
            rows += measure(models, batches, tokens, runs, vocab, log=log)
            facts.update((name, f) for name, (_, f) in models.items())
            models = None
            torch._dynamo.reset()
            _free()
        rows = with_ratios(rows)
        peak = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    transformers = _transformers()
    return {"spec": spec, "layers": layers, "tokens": tokens, "prompt": PROMPT, "runs": runs,
            "in_turns": len(groups) == 1, "device": device_info(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peak_memory_gb": peak,
            "variants": [dict(f, rows=[r for r in rows if r["variant"] == name]) for name, f in facts.items()]}


def table(result: dict) -> str:
    """A markdown table: tokens/s and the speedup over bf16 (``vs_bf16``: the median of the per-round
    ratios, or from the medians where the variants were measured alone) per mode and batch, memory
    after load."""
    lines = ["| weights | GPU memory after load | mode | batch | tokens/s | vs bf16 | tokens vs exact path |",
             "|---|---|---|---|---|---|---|"]
    for v in result["variants"]:
        for r in v["rows"]:
            t = r.get("tokens")
            tok = "" if t is None else f"{t['equal']} equal, {t['ties']} ties, {t['mismatches']} mismatches"
            speed = f"{r['vs_bf16']:.2f}x" if "vs_bf16" in r else "-"
            lines.append(f"| {v['variant']} | {v['memory_gb']:.2f} GB | {r['mode']} | {r['batch']} | "
                         f"{r['tokens_per_s']:.1f} | {speed} | {tok} |")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
