"""End-to-end decoding benchmark: tokens/s of greedy decoding, fp16 vs ExMy weights, on one GPU.

``exmyconv bench --e2e SPEC`` (docs/benchmarks.md, "End-to-end decoding"). SPEC is ``llama3-8b``
(hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads, vocab 128256) or a
transformers ``config.json`` (or a folder holding one) of a Llama-shaped model; ``--layers N``
shrinks it. Weights are random (speed does not depend on their values): fp16 ``randn`` scaled
to std 0.02, and for ExMy uniformly random codes with one fp16 scale per output row chosen so the
weights have about the same spread. Nothing is converted or read from disk.

The harness is one hand-written Llama decoder step (RMSNorm, rotary embedding, grouped-query
attention over a static KV cache with ``F.scaled_dot_product_attention``, SwiGLU MLP) used for
every variant; only the decoder Linears differ: fp16 cuBLAS (``F.linear`` / ``torch.mm``) or the
fused ExMy GEMV (:func:`exmyconv.cuda.gpu.gemv`). q/k/v are one fused matrix and gate/up another, in both
variants (4 GEMVs per layer). Embeddings and ``lm_head`` stay fp16 in both variants. One step
embeds the current tokens, runs the layers, takes the argmax of the logits and writes it back as
the next token and advances the position, all on the GPU, so the step can be captured once in a
CUDA graph and replayed per token (no host work per token beyond one replay launch). Timed
"eager" too (the same step called from Python), which shows what launch and Python overhead cost.

On a GPU with CuPy the step's small operations are fused CUDA kernels (kernels/llama_ops.cu,
``fused=True``, the same for every variant), so that a layer is: add+RMSNorm -> q/k/v GEMV ->
rotary embedding + KV-cache write + attention (one kernel) -> o GEMV -> add+RMSNorm -> gate/up GEMV
-> SiLU*mul -> down GEMV (whose residual add is the next add+RMSNorm), into buffers allocated once.
They round as the torch ops they replace (bit-exact except RMSNorm, within 1 fp16 ulp, and the
attention, within float noise of ``F.scaled_dot_product_attention``; for head shapes the attention
kernel does not take, ``LlamaOps.attends``, or with ``attend=False``: rotary + cache write, then
SDPA); ``fused=False`` (and on the CPU) runs the plain torch ops. Results record which ran
(``fused_ops``, ``fused_attention``). With the fused kernels on a GPU of compute capability >= 9.0,
the ExMy GEMVs and the fused kernels are launched with programmatic dependent launch (``overlap``,
exmyconv.cuda.launch): a GEMV issues its first weight loads while the kernel before it is still
finishing. cuBLAS and torch kernels launch as usual.

Timing: a warm-up run, then ``runs`` runs of ``tokens`` greedy steps each from position 0 (KV
cache of ``tokens`` positions); CUDA events around each run; the median is reported. tokens/s
counts every sequence of the batch (batch x tokens / time).
"""
from __future__ import annotations

import functools
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import ExmyError
from ..format.exmy import get_format
from ..format.layout import CONFIG_FILE
from ..io.validate import read_json

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


# A DecoderConfig: a Llama-shaped model for both benches. A dict: the fields of a transformers config
# (model_type first) for `--generate` alone; qwen3-moe has Qwen3-30B-A3B's shapes (48 MoE layers of
# 128 experts, 8 routed per token).
PRESETS = {
    "llama3-8b": DecoderConfig(),
    "qwen3-moe": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                  "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                  "norm_topk_prob": True, "num_hidden_layers": 48, "num_attention_heads": 32,
                  "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936, "rope_theta": 1000000.0,
                  "rms_norm_eps": 1e-6, "max_position_embeddings": 40960, "tie_word_embeddings": False},
}


def build_config(spec: str, layers: int | None = None) -> DecoderConfig:
    """A preset name, or a transformers config.json (file or folder) of a Llama-shaped model."""
    if spec in PRESETS:
        cfg = PRESETS[spec]
        if not isinstance(cfg, DecoderConfig):
            raise ExmyError(f"--e2e {spec}: a transformers model for `--e2e {spec} --generate` only (this bench "
                            f"builds Llama-shaped decoders)")
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / CONFIG_FILE
        if not path.is_file():
            raise ExmyError(f"--e2e {spec!r}: not a preset ({', '.join(PRESETS)}) nor a config.json or a folder with one")
        raw = read_json(path)
        raw = raw.get("text_config", raw)
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


# ----------------------------------------------------------------------------- the model (GPU)

class _Linear:
    """y = x W^T without bias: fp16 cuBLAS, or the fused ExMy GEMV (into `out` when given)."""

    def __init__(self, k: int, n: int, fmt: str, gen, device="cuda", overlap: bool = False):
        import torch

        self.k, self.n, self.fmt, self.overlap = k, n, fmt, overlap
        self._launches = {}
        if fmt == FP16:
            self.w = (torch.randn((n, k), device=device, dtype=torch.float16, generator=gen) * 0.02)
            self.nbytes = self.w.numel() * 2
        else:
            from ..cuda import gpu
            from ..format.pack import row_bytes

            f = get_format(fmt)
            payload = torch.randint(0, 256, (n, row_bytes(f, k)), device="cuda", dtype=torch.uint8, generator=gen)
            rms = float((f.table.astype("float64") ** 2).mean() ** 0.5)
            scales = ((torch.rand((n, 1), device="cuda", generator=gen) * 0.5 + 0.75) * (0.02 / rms)).half()
            self.w = gpu.upload(payload=payload, scales=scales, scale_dtype="F16", fmt=f, shape=(n, k))
            # the GpuWeight views these buffers (in tile order it holds a reordered copy of the payload)
            self._keep = (payload, scales) if self.w.order == "row" else (scales,)
            self.nbytes = self.w.nbytes

    def __call__(self, x, out=None):
        import torch
        import torch.nn.functional as F

        if self.fmt == FP16:
            return F.linear(x, self.w) if out is None else torch.mm(x, self.w.t(), out=out)
        from ..cuda import gpu
        from ..cuda.launch import torch_stream
        from ..torch.linear import call_gemv

        if out is None:
            out = torch.empty((x.shape[0], self.n), device=x.device, dtype=x.dtype)
        if x.shape[0] > gpu.MAX_BATCH or x.data_ptr() % 16 or not x.is_contiguous():
            return gpu.gemv(x, self.w, out=out)
        key = (x.shape[0], x.dtype)
        launch = self._launches.get(key)
        if launch is None:  # prepared once per batch: a call passes only x, out and the stream
            launch = self._launches[key] = gpu.GemvLaunch(
                self.w, "F16" if x.dtype == torch.float16 else "BF16", x.shape[0], overlap=self.overlap)
        call_gemv(launch, x.data_ptr(), out.data_ptr(), x.device, torch_stream(x.device))
        return out


def overlap_available(device) -> bool:
    """True when kernels on `device` can use programmatic dependent launch (compute capability >= 9.0)."""
    import torch

    from ..torch.linear import pdl_ok

    return fused_available(device) and pdl_ok(torch.device(device))


def fused_available(device) -> bool:
    """True when the fused step kernels can run on `device` (a CUDA device, and exmyconv's CUDA path here)."""
    import torch

    from ..cuda import device as probe

    return torch.device(device).type == "cuda" and probe.available()


@functools.lru_cache(maxsize=None)
def _llama_module(device_index: int):
    import cupy

    from ..cuda import gpu

    with cupy.cuda.Device(device_index):
        mod = cupy.RawModule(code=gpu.kernel_source("llama_ops.cu"), options=("--std=c++17",))
        return {name: mod.get_function(name) for name in ("llama_add_rms_norm", "llama_rope_cache", "llama_silu_mul",
                                                           "llama_argmax_advance", "llama_rope_attend")}


class LlamaOps:
    """Launchers of kernels/llama_ops.cu on torch's current CUDA stream (so torch.cuda.graph
    captures them). Arguments are contiguous fp16 CUDA tensors, passed as raw pointers."""

    THREADS = 256

    def __init__(self, device, overlap: bool = False):
        import torch

        self.device = torch.device(device)
        self.overlap = overlap  # programmatic dependent launch (exmyconv.cuda.launch)
        self.fn = _llama_module(self.device.index if self.device.index is not None else torch.cuda.current_device())
        self._streams = {}
        self._attend_work = {}  # rope_attend: (row x KV heads, g, hd, max_len) -> (chunk, splits, work, count)

    def _stream(self):
        from ..cuda import gpu
        from ..cuda.launch import torch_stream

        handle = torch_stream(self.device)
        s = self._streams.get(handle)
        if s is None:
            s = self._streams[handle] = gpu.cupy_stream(handle)
        return s

    @staticmethod
    def _ptr(t, dtype=None):
        import numpy as np
        import torch

        assert t.is_cuda and t.is_contiguous() and t.dtype == (dtype or torch.float16), (t.dtype, t.shape)
        return np.uint64(t.data_ptr())

    def _launch(self, name, grid, block, args):
        if self.overlap:
            from ..cuda.launch import Launch

            Launch(self.fn[name], (grid,), (block,), args)(self._stream().ptr)
            return
        with self._stream():
            self.fn[name]((grid,), (block,), args)

    def add_rms_norm(self, h, delta, w, out, eps: float):
        """h += delta (if not None, in place), out = rms_norm(h) * w; h, delta, out [B, H]."""
        import numpy as np

        b, n = h.shape
        assert w.numel() == n and out.shape == h.shape and (delta is None or delta.shape == h.shape)
        threads = min(1024, -(-n // 256) * 32)  # 8 consecutive elements per thread and slot, 2 slots at most
        assert n <= 16 * threads, f"hidden {n} > 16384"
        args = (self._ptr(h), self._ptr(h if delta is None else delta), self._ptr(w), self._ptr(out),
                np.int32(n), np.int32(delta is not None), np.float32(eps))
        self._launch("llama_add_rms_norm", b, threads, args)

    def rope_cache(self, qkv, cos, sin, pos, q_out, k_cache, v_cache):
        """Rotary q/k at position pos[0] (a device int64 tensor); q -> q_out [B, Hq, hd], k and v
        -> k_cache/v_cache[:, :, pos] ([B, Hkv, max_len, hd])."""
        import numpy as np
        import torch

        b, hq, hd = q_out.shape
        hkv, max_len = k_cache.shape[1], k_cache.shape[2]
        assert qkv.shape == (b, (hq + 2 * hkv) * hd) and k_cache.shape == v_cache.shape == (b, hkv, max_len, hd)
        assert cos.shape == sin.shape == (max_len, hd) and pos.numel() == 1
        total = b * (hq + 2 * hkv) * (hd // 2)
        args = (self._ptr(qkv), self._ptr(cos), self._ptr(sin), self._ptr(pos, torch.int64), self._ptr(q_out),
                self._ptr(k_cache), self._ptr(v_cache), np.int32(b), np.int32(hq), np.int32(hkv), np.int32(hd),
                np.int32(max_len))
        self._launch("llama_rope_cache", -(-total // self.THREADS), self.THREADS, args)

    @staticmethod
    def attends(hq: int, hkv: int, hd: int) -> bool:
        """Whether rope_attend takes these heads (kernels/llama_ops.cu llama_rope_attend)."""
        return hq % hkv == 0 and hq // hkv in (1, 2, 4, 8, 16) and hd % 32 == 0 and hd <= 256

    def rope_attend(self, qkv, cos, sin, pos, k_cache, v_cache, out):
        """rope_cache's rotation and cache writes, then attention of the rotated queries over cache
        positions 0 .. pos[0] into out [B, Hq, hd] (one kernel; see attends). The positions are split
        between blocks (about two waves of the GPU's SMs, at least 128 positions each) whose partial
        softmax sums meet in a workspace kept here per shape (made on first use: outside a CUDA
        graph capture)."""
        import numpy as np
        import torch

        b, hq, hd = out.shape
        hkv, max_len = k_cache.shape[1], k_cache.shape[2]
        assert self.attends(hq, hkv, hd), (hq, hkv, hd)
        assert qkv.shape == (b, (hq + 2 * hkv) * hd) and k_cache.shape == v_cache.shape == (b, hkv, max_len, hd)
        assert cos.shape == sin.shape == (max_len, hd) and pos.numel() == 1
        key = (b * hkv, hq // hkv, hd, max_len)
        if key not in self._attend_work:
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            most = max(1, 2 * sms // (b * hkv))
            # (at most 128 positions in one block: merging splits cost more than it saved there)
            chunk = max(128, -(-max_len // (16 * most)) * 16)  # ceil(max_len / most), up to a multiple of 16
            splits = -(-max_len // chunk)
            work = torch.empty(b * hkv * splits * (hq // hkv) * (hd + 2), device=self.device, dtype=torch.float32)
            count = torch.zeros(b * hkv, device=self.device, dtype=torch.int32)
            self._attend_work[key] = (chunk, splits, work, count)
        chunk, splits, work, count = self._attend_work[key]
        args = (self._ptr(qkv), self._ptr(cos), self._ptr(sin), self._ptr(pos, torch.int64), self._ptr(k_cache),
                self._ptr(v_cache), self._ptr(out), self._ptr(work, torch.float32), self._ptr(count, torch.int32),
                np.int32(hq), np.int32(hkv), np.int32(hd), np.int32(max_len), np.int32(chunk), np.int32(splits))
        self._launch("llama_rope_attend", b * hkv * splits, 512, args)

    def argmax_advance(self, logits, tok, pos=None):
        """tok [B] (int64) = logits.argmax(-1) (first maximum); then pos[0] += 1 (if given)."""
        import numpy as np
        import torch

        b, vocab = logits.shape
        assert tok.shape == (b,) and (pos is None or pos.numel() == 1)
        args = (self._ptr(logits), np.int32(vocab), self._ptr(tok, torch.int64),
                np.uint64(0) if pos is None else self._ptr(pos, torch.int64))
        self._launch("llama_argmax_advance", b, 1024, args)

    def silu_mul(self, gu, out):
        """out [B, I] = silu(gu[:, :I]) * gu[:, I:]."""
        import numpy as np

        b, inter = out.shape
        assert gu.shape == (b, 2 * inter)
        args = (self._ptr(gu), self._ptr(out), np.int32(b), np.int32(inter))
        self._launch("llama_silu_mul", -(-(b * inter) // self.THREADS), self.THREADS, args)


class Decoder:
    """Random-weight Llama decoder for batched greedy decoding over a static KV cache."""

    def __init__(self, cfg: DecoderConfig, fmt: str, batch: int, max_len: int, seed: int = 0, device="cuda",
                 fused: bool | None = None, overlap: bool | None = None, attend: bool | None = None):
        import torch

        self.cfg, self.fmt, self.batch, self.max_len = cfg, fmt, batch, max_len
        dev = self.device = torch.device(device)  # "cpu" for tests of the fp16 variant only
        gen = torch.Generator(device=dev).manual_seed(seed)
        h, hd = cfg.hidden, cfg.hd
        self.fused = fused_available(dev) if fused is None else bool(fused)
        self.attend = False  # set below with the fused kernels
        self.overlap = self.fused and (overlap_available(dev) if overlap is None else bool(overlap))
        self.embed = torch.randn((cfg.vocab, h), device=dev, dtype=torch.float16, generator=gen)
        self.lm_head = torch.randn((cfg.vocab, h), device=dev, dtype=torch.float16, generator=gen) * 0.02
        self.norm = torch.ones(h, device=dev, dtype=torch.float16)
        self.layers = []
        for _ in range(cfg.layers):
            self.layers.append({
                "ln1": torch.ones(h, device=dev, dtype=torch.float16),
                "ln2": torch.ones(h, device=dev, dtype=torch.float16),
                "lin": [_Linear(k, n, fmt, gen, dev, self.overlap) for k, n in cfg.linear_shapes()],
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
        if self.fused:  # the fused step's buffers (static shapes: graph-friendly, nothing allocated per step)
            self.ops = LlamaOps(dev, overlap=self.overlap)
            f16 = dict(device=dev, dtype=torch.float16)
            self._h = torch.zeros((batch, h), **f16)        # the residual stream
            self._x = torch.empty((batch, h), **f16)        # normed input of the next GEMV
            self._qkv = torch.empty((batch, (cfg.heads + 2 * cfg.kv_heads) * hd), **f16)
            self.attend = LlamaOps.attends(cfg.heads, cfg.kv_heads, hd) if attend is None else bool(attend)
            self._a = torch.empty((batch, cfg.heads, hd), **f16)  # attention output (rope_attend)
            self._o = torch.empty((batch, h), **f16)
            self._gu = torch.empty((batch, 2 * cfg.intermediate), **f16)
            self._act = torch.empty((batch, cfg.intermediate), **f16)
            self._d = torch.empty((batch, h), **f16)
            if not self.attend:
                self._q = torch.empty((batch, cfg.heads, hd), **f16)  # rotated queries (rope_cache)
                # SDPA's mask as fp16 0 / -inf, made once per step: given a bool mask, SDPA converted
                # it again in every layer (three small kernels per layer)
                self._mask = torch.empty(max_len, device=dev, dtype=torch.bool)
                self._amask = torch.empty(max_len, **f16)
                self._zeros = torch.zeros(max_len, **f16)
                self._ninf = torch.full((max_len,), float("-inf"), **f16)

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
        import torch.nn.functional as F

        if self.fused:
            return self._step_fused()
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

    def _step_fused(self):
        """step() with the fused kernels (kernels/llama_ops.cu) into the preallocated buffers."""
        import torch
        import torch.nn.functional as F

        cfg, b, hd, ops, eps = self.cfg, self.batch, self.cfg.hd, self.ops, self.cfg.rms_eps
        if not self.attend:
            torch.le(self.positions, self.pos, out=self._mask)
            torch.where(self._mask, self._zeros, self._ninf, out=self._amask)
            mask = self._amask.view(1, 1, 1, self.max_len)
            q = self._q.view(b, cfg.kv_heads, cfg.heads // cfg.kv_heads, hd)  # GQA: query rows of a KV head
        torch.index_select(self.embed, 0, self.tok, out=self._h)
        h, x, delta = self._h, self._x, None
        for layer in self.layers:
            qkv_l, o_l, gu_l, down_l = layer["lin"]
            ops.add_rms_norm(h, delta, layer["ln1"], x, eps)  # h += previous layer's MLP output
            qkv_l(x, out=self._qkv)
            if self.attend:  # rotary, cache write and attention in one kernel
                ops.rope_attend(self._qkv, self.cos, self.sin, self.pos, layer["k"], layer["v"], self._a)
                o_l(self._a.view(b, cfg.heads * hd), out=self._o)
            else:
                ops.rope_cache(self._qkv, self.cos, self.sin, self.pos, self._q, layer["k"], layer["v"])
                a = F.scaled_dot_product_attention(q, layer["k"], layer["v"], attn_mask=mask)
                o_l(a.reshape(b, cfg.heads * hd), out=self._o)
            ops.add_rms_norm(h, self._o, layer["ln2"], x, eps)
            gu_l(x, out=self._gu)
            ops.silu_mul(self._gu, self._act)
            delta = down_l(self._act, out=self._d)
        ops.add_rms_norm(h, delta, self.norm, x, eps)
        logits = self.logits = F.linear(x, self.lm_head)
        ops.argmax_advance(logits, self.tok, self.pos)  # tok <- argmax, pos += 1

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
            seed: int = 0, log=print, fused: bool | None = None, overlap: bool | None = None) -> dict:
    """Tokens/s of greedy decoding for one variant and batch (graph and, if asked, eager).
    fused / overlap: the fused step kernels / programmatic dependent launch (None: when
    available, see Decoder)."""
    import torch

    model = Decoder(cfg, fmt, batch, max_len=tokens, seed=seed, fused=fused, overlap=overlap)
    first = torch.randint(0, cfg.vocab, (batch,), device="cuda",
                          generator=torch.Generator(device="cuda").manual_seed(seed + 1))
    result = {"format": fmt, "batch": batch, "tokens": tokens, "runs": runs,
              "weight_bytes_per_layer": model.layer_bytes, "layers": cfg.layers, "fused_ops": model.fused,
              "fused_attention": model.fused and model.attend,
              "overlap": model.overlap}

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
        eager: bool = True, log=print, fused: bool | None = None, overlap: bool | None = None) -> dict:
    import torch

    from ..cuda import gpu

    out = {"config": asdict(cfg), "device": gpu.device_info(), "torch": torch.__version__, "results": []}
    for batch in batches:
        for fmt in formats:
            r = measure(cfg, fmt, batch, tokens=tokens, runs=runs, eager=eager, log=log, fused=fused,
                        overlap=overlap)
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
