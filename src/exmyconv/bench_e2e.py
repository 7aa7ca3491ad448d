"""End-to-end decoding benchmark: tokens/s of greedy decoding, fp16 vs ExMy weights, on one GPU.

``exmyconv bench --e2e SPEC`` (docs/benchmarks.md, "End-to-end decoding"). SPEC is ``llama3-8b``
(hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256) or a
transformers ``config.json`` (or a folder holding one) of a Llama-shaped model; ``--layers N``
shrinks it. Weights are random (speed does not depend on their values): fp16 ``randn`` scaled
to std 0.02, and for ExMy uniformly random codes with one fp16 scale per output row chosen so the
weights have about the same spread. Nothing is converted or read from disk.

The harness is one hand-written Llama decoder step (RMSNorm, rotary embedding, grouped-query
attention over a static KV cache with ``F.scaled_dot_product_attention``, SwiGLU MLP) used for
every variant; only the decoder Linears differ: fp16 ``F.linear`` (cuBLAS) or the fused ExMy
GEMV (:func:`exmyconv.gpu.gemv`). q/k/v are one fused matrix and gate/up another, in both
variants (4 GEMVs per layer). Embeddings and ``lm_head`` stay fp16 in both variants. One step
embeds the current tokens, runs the layers, takes the argmax of the logits and writes it back as
the next token and advances the position, all on the GPU, so the step can be captured once in a
CUDA graph and replayed per token (no host work per token beyond one replay launch). Timed
"eager" too (the same step called from Python), which shows what launch and Python overhead cost.

Timing: a warm-up run, then ``runs`` runs of ``tokens`` greedy steps each from position 0 (KV
cache of ``tokens`` positions); CUDA events around each run; the median is reported. tokens/s
counts every sequence of the batch (batch x tokens / time).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import ExmyError
from .formats import get_format

FP16 = "fp16"
DEFAULT_FORMATS = ("e2m2", "e2m1", "e4m3")
DEFAULT_BATCHES = (1, 4)


@dataclass(frozen=True)
class DecoderConfig:
    hidden: int = 4096
    intermediate: int = 14336
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 128256
    head_dim: int = 0          # 0: hidden // heads
    rope_theta: float = 500000.0
    rms_eps: float = 1e-5

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def check(self) -> "DecoderConfig":
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            if getattr(self, name) < 1:
                raise ExmyError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ExmyError(f"config: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if not self.head_dim and self.hidden % self.heads:
            raise ExmyError(f"config: hidden ({self.hidden}) is not a multiple of heads ({self.heads})")
        if self.hd % 2:
            raise ExmyError(f"config: head dim {self.hd} must be even (rotary embedding)")
        return self

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(K inputs, N outputs) of the 4 GEMVs of one layer (q/k/v fused, gate/up fused)."""
        h, hd = self.hidden, self.hd
        return [(h, (self.heads + 2 * self.kv_heads) * hd), (self.heads * hd, h),
                (h, 2 * self.intermediate), (self.intermediate, h)]

    def layer_params(self) -> int:
        return sum(k * n for k, n in self.linear_shapes())


PRESETS = {"llama3-8b": DecoderConfig()}


def build_config(spec: str, layers: int | None = None) -> DecoderConfig:
    """A preset name, or a transformers config.json (file or folder) of a Llama-shaped model."""
    if spec in PRESETS:
        cfg = PRESETS[spec]
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ExmyError(f"--e2e {spec!r}: not a preset ({', '.join(PRESETS)}) nor a config.json or a folder with one")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ExmyError(f"{path}: cannot read a JSON config ({err})") from None
        raw = raw.get("text_config", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict) or "hidden_size" not in raw:
            raise ExmyError(f"{path}: no hidden_size: not a transformers model config")
        try:
            heads = int(raw["num_attention_heads"])
            rope = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta") or 10000.0
            cfg = DecoderConfig(hidden=int(raw["hidden_size"]), intermediate=int(raw["intermediate_size"]),
                                layers=int(raw["num_hidden_layers"]), heads=heads,
                                kv_heads=int(raw.get("num_key_value_heads") or heads), vocab=int(raw["vocab_size"]),
                                head_dim=int(raw.get("head_dim") or 0), rope_theta=float(rope),
                                rms_eps=float(raw.get("rms_norm_eps", 1e-5)))
        except (KeyError, TypeError, ValueError) as err:
            raise ExmyError(f"{path}: missing or bad field for a Llama-shaped model ({err})") from None
    if layers is not None:
        if layers < 1:
            raise ExmyError(f"--layers must be at least 1, got {layers}")
        cfg = replace(cfg, layers=int(layers))
    return cfg.check()


def parse_formats(text: str | None) -> list[str]:
    """'e2m2,e4m3' -> ['fp16', 'e2m2', 'e4m3'] (fp16 first, always)."""
    names = [FP16]
    for part in (text.split(",") if text else DEFAULT_FORMATS):
        part = part.strip().lower()
        if not part or part in names:
            continue
        if part in (FP16, "f16", "float16"):
            continue
        names.append(get_format(part).name)
    return names


def parse_batches(text: str | None) -> list[int]:
    if not text:
        return list(DEFAULT_BATCHES)
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ExmyError(f"bad batches {text!r}: use e.g. 1,4") from None
    if not out or not all(1 <= v <= 16 for v in out):
        raise ExmyError("batches must be between 1 and 16 (the fused GEMV takes up to 16 rows)")
    return out


def unavailable_reason() -> str:
    """'' when a CUDA GPU is usable by both torch and exmyconv.gpu, else why not (one line)."""
    try:
        from . import gpu

        reason = gpu.unavailable_reason()
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
    if reason:
        return f"needs a CUDA GPU with CuPy: {reason}"
    try:
        import torch

        if not torch.cuda.is_available():
            return "needs PyTorch with CUDA"
    except Exception as err:
        return f"needs PyTorch with CUDA ({type(err).__name__}: {err})"
    return ""


# ----------------------------------------------------------------------------- the model (GPU)

class _Linear:
    """y = x W^T without bias: fp16 F.linear, or the fused ExMy GEMV into a fresh output."""

    def __init__(self, k: int, n: int, fmt: str, gen, device="cuda"):
        import torch

        self.k, self.n, self.fmt = k, n, fmt
        if fmt == FP16:
            self.w = (torch.randn((n, k), device=device, dtype=torch.float16, generator=gen) * 0.02)
            self.nbytes = self.w.numel() * 2
        else:
            from . import gpu
            from .pack import row_bytes

            f = get_format(fmt)
            payload = torch.randint(0, 256, (n, row_bytes(f, k)), device="cuda", dtype=torch.uint8, generator=gen)
            rms = float((f.table.astype("float64") ** 2).mean() ** 0.5)
            scales = ((torch.rand((n, 1), device="cuda", generator=gen) * 0.5 + 0.75) * (0.02 / rms)).half()
            self._keep = (payload, scales)  # the GpuWeight views these buffers
            self.w = gpu.upload(payload=payload, scales=scales, scale_dtype="F16", fmt=f, shape=(n, k))
            self.nbytes = self.w.nbytes

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        if self.fmt == FP16:
            return F.linear(x, self.w)
        from . import gpu

        out = torch.empty((x.shape[0], self.n), device=x.device, dtype=x.dtype)
        return gpu.gemv(x, self.w, out=out)


class Decoder:
    """Random-weight Llama decoder for batched greedy decoding over a static KV cache."""

    def __init__(self, cfg: DecoderConfig, fmt: str, batch: int, max_len: int, seed: int = 0, device="cuda"):
        import torch

        self.cfg, self.fmt, self.batch, self.max_len = cfg, fmt, batch, max_len
        dev = self.device = torch.device(device)  # "cpu" for tests of the fp16 variant only
        gen = torch.Generator(device=dev).manual_seed(seed)
        h, hd = cfg.hidden, cfg.hd
        self.embed = torch.randn((cfg.vocab, h), device=dev, dtype=torch.float16, generator=gen)
        self.lm_head = torch.randn((cfg.vocab, h), device=dev, dtype=torch.float16, generator=gen) * 0.02
        self.norm = torch.ones(h, device=dev, dtype=torch.float16)
        self.layers = []
        for _ in range(cfg.layers):
            self.layers.append({
                "ln1": torch.ones(h, device=dev, dtype=torch.float16),
                "ln2": torch.ones(h, device=dev, dtype=torch.float16),
                "lin": [_Linear(k, n, fmt, gen, dev) for k, n in cfg.linear_shapes()],
                "k": torch.zeros((batch, cfg.kv_heads, max_len, hd), device=dev, dtype=torch.float16),
                "v": torch.zeros((batch, cfg.kv_heads, max_len, hd), device=dev, dtype=torch.float16),
            })
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(max_len, device=dev, dtype=torch.float32), inv)
        ang = torch.cat([ang, ang], dim=-1)
        self.cos, self.sin = ang.cos().half(), ang.sin().half()
        self.positions = torch.arange(max_len, device=dev)
        self.tok = torch.zeros(batch, device=dev, dtype=torch.long)   # static input: current tokens
        self.pos = torch.zeros(1, device=dev, dtype=torch.long)       # static input: current position
        self.layer_bytes = sum(lin.nbytes for lin in self.layers[0]["lin"]) if self.layers else 0

    def reset(self, first_tokens):
        self.tok.copy_(first_tokens)
        self.pos.zero_()

    def _rms(self, x, w):
        import torch.nn.functional as F

        return F.rms_norm(x, (x.shape[-1],), w, self.cfg.rms_eps)

    @staticmethod
    def _rope(x, cos, sin):
        import torch

        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def step(self):
        """One greedy decoding step, entirely on the GPU: tok <- argmax(logits), pos += 1."""
        import torch
        import torch.nn.functional as F

        cfg, b, hd = self.cfg, self.batch, self.cfg.hd
        nq, nkv = cfg.heads * hd, cfg.kv_heads * hd
        cos = self.cos.index_select(0, self.pos).view(1, 1, hd)
        sin = self.sin.index_select(0, self.pos).view(1, 1, hd)
        mask = (self.positions <= self.pos).view(1, 1, 1, self.max_len)
        h = F.embedding(self.tok, self.embed)
        nh, g = cfg.heads + cfg.kv_heads, cfg.heads // cfg.kv_heads
        for layer in self.layers:
            qkv_l, o_l, gu_l, down_l = layer["lin"]
            qkv = qkv_l(self._rms(h, layer["ln1"]))
            # rotary embedding of q and k in one pass; v as is
            qk = self._rope(qkv[:, :nq + nkv].reshape(b, nh, hd), cos, sin)
            layer["k"].index_copy_(2, self.pos, qk[:, cfg.heads:].unsqueeze(2))
            layer["v"].index_copy_(2, self.pos, qkv[:, nq + nkv:].view(b, cfg.kv_heads, 1, hd))
            # grouped-query attention of one position: the g query heads of a KV head are the
            # "query rows" of that head (one fused attention kernel, no K/V repeat)
            q = qk[:, :cfg.heads].reshape(b, cfg.kv_heads, g, hd)
            a = F.scaled_dot_product_attention(q, layer["k"], layer["v"], attn_mask=mask)
            h = h + o_l(a.reshape(b, nq))
            gu = gu_l(self._rms(h, layer["ln2"]))
            h = h + down_l(F.silu(gu[:, :cfg.intermediate]) * gu[:, cfg.intermediate:])
        logits = self.logits = F.linear(self._rms(h, self.norm), self.lm_head)
        self.tok.copy_(logits.argmax(-1))
        self.pos.add_(1)

    def capture(self):
        """The step as a CUDA graph (after eager warm-up steps: kernels compiled, scales prepared)."""
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        return graph


def _time_runs(run_once, runs: int) -> list[float]:
    import torch

    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run_once()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return times


def measure(cfg: DecoderConfig, fmt: str, batch: int, tokens: int = 128, runs: int = 5, eager: bool = True,
            seed: int = 0, log=print) -> dict:
    """Tokens/s of greedy decoding for one variant and batch (graph and, if asked, eager)."""
    import torch

    model = Decoder(cfg, fmt, batch, max_len=tokens, seed=seed)
    first = torch.randint(0, cfg.vocab, (batch,), device="cuda",
                          generator=torch.Generator(device="cuda").manual_seed(seed + 1))
    result = {"format": fmt, "batch": batch, "tokens": tokens, "runs": runs,
              "weight_bytes_per_layer": model.layer_bytes, "layers": cfg.layers}

    def eager_run(n=tokens):
        model.reset(first)
        out = []
        for _ in range(n):
            model.step()
            out.append(model.tok.clone())
        return out

    ref = eager_run(min(tokens, 8))  # warm-up: compiles kernels, caches GEMV scales
    torch.cuda.synchronize()
    if eager:
        eager_run()
        t = _time_runs(eager_run, runs)
        result["eager_s"] = t
        result["eager_tok_s"] = batch * tokens / statistics.median(t)
    try:
        graph = model.capture()
        model.reset(first)
        got = []
        for _ in range(len(ref)):
            graph.replay()
            got.append(model.tok.clone())
        result["graph_matches_eager"] = bool(all(torch.equal(a, b) for a, b in zip(ref, got)))

        def graph_run():
            model.reset(first)
            for _ in range(tokens):
                graph.replay()

        graph_run()
        t = _time_runs(graph_run, runs)
        result["graph_s"] = t
        result["graph_tok_s"] = batch * tokens / statistics.median(t)
    except Exception as err:  # report eager numbers rather than nothing
        result["graph_error"] = f"{type(err).__name__}: {err}"
        log(f"  {fmt} b{batch}: CUDA graph failed: {result['graph_error']}")
    del model
    torch.cuda.empty_cache()
    return result


def run(cfg: DecoderConfig, formats: list[str], batches: list[int], tokens: int = 128, runs: int = 5,
        eager: bool = True, log=print) -> dict:
    import torch

    from . import gpu

    out = {"config": asdict(cfg), "device": gpu.device_info(), "torch": torch.__version__, "results": []}
    for batch in batches:
        for fmt in formats:
            r = measure(cfg, fmt, batch, tokens=tokens, runs=runs, eager=eager, log=log)
            log(f"  b{batch} {fmt}: graph {r.get('graph_tok_s', float('nan')):.1f} tok/s, "
                f"eager {r.get('eager_tok_s', float('nan')):.1f} tok/s, graph==eager {r.get('graph_matches_eager')}")
            out["results"].append(r)
    return out


def table(result: dict) -> str:
    """Markdown table: tokens/s (graph, eager) per format and batch, speedup over fp16."""
    rows = ["| batch | weights | tok/s (CUDA graph) | speedup | tok/s (eager) | speedup | ms/token (graph) |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    base = {}
    for r in result["results"]:
        if r["format"] == FP16:
            base[r["batch"]] = r
    for r in result["results"]:
        b0 = base.get(r["batch"], {})
        g, e = r.get("graph_tok_s"), r.get("eager_tok_s")
        sg = f"{g / b0['graph_tok_s']:.2f}×" if g and b0.get("graph_tok_s") else "—"
        se = f"{e / b0['eager_tok_s']:.2f}×" if e and b0.get("eager_tok_s") else "—"
        ms = f"{1000 * r['batch'] / g:.2f}" if g else "—"
        rows.append(f"| {r['batch']} | {r['format']} | {g:.1f} | {sg} | " if g else f"| {r['batch']} | {r['format']} | — | — | ")
        rows[-1] += f"{e:.1f} | {se} | {ms} |" if e else f"— | — | {ms} |"
    return "\n".join(rows)
