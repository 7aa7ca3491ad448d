"""GPU benchmark: dequantization bandwidth and fused GEMV against torch fp16 F.linear (cuBLAS).

Method (docs/benchmarks.md): random codes and random fp16 scales (never zeros), several copies of
every weight rotated so that the data touched per measurement exceeds the L2 cache several times
over, warm-up launches first, then each launch timed alone with CUDA events; the GPU is kept busy
(a sleep kernel) while the host queues a round of launches, so host launch overhead stays out of
the numbers. Reported times are medians.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import subprocess
from pathlib import Path

import numpy as np

from ..cuda import gpu
from ..errors import ExmyError
from ..format.exmy import NAMED, get_format
from ..format.pack import row_bytes
from ..format.quant import groups_of
from . import peers as peer_kernels

# (K inputs, N outputs) of nn.Linear layers found in LLMs.
STANDARD_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192))
BATCHES = (1, 2, 4, 8, 16)
ROTATE_BYTES = 256 * 2**20     # rotate at least this much data per measurement (H100 L2: 50 MB)
MIN_COPIES = 4


def shape_label(k: int, n: int) -> str:
    return f"{k}->{n}"


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4096,8192->28672' -> [(K, N), ...] (K inputs, N outputs)."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        for sep in ("->", "x", "X", ":"):
            if sep in part:
                a, b = part.split(sep, 1)
                break
        else:
            raise ExmyError(f"bad shape {part!r}: use KxN or K->N (K inputs, N outputs)")
        try:
            out.append((int(a), int(b)))
        except ValueError:
            raise ExmyError(f"bad shape {part!r}: use KxN or K->N (K inputs, N outputs)") from None
    if not out:
        raise ExmyError("no shapes given")
    return out


def checkpoint_shapes(path: str | Path) -> list[tuple[int, int]]:
    """Distinct (K, N) of the 2-D+ weights of a checkpoint folder or .safetensors file, largest first.

    For an exmy checkpoint the shapes of its quantized tensors; for a plain one, the float tensors named
    *.weight with at least 2 dimensions (leading dimensions folded into N). Read by the checkpoint reader.
    """
    from ..format.dtypes import FLOAT
    from ..io.checkpoint import Checkpoint

    with Checkpoint(str(path)) as ckpt:
        found = [record.shape for record, _ in ckpt.records.values()]
        if not found:
            found = [info.shape for name, (info, _) in ckpt.plain.items()
                     if name.endswith(".weight") and len(info.shape) >= 2 and info.dtype in FLOAT]
    shapes = {(int(s[-1]), int(np.prod(s[:-1]))) for s in found}
    if not shapes:
        raise ExmyError(f"{path}: no weight matrices found")
    return sorted(shapes, key=lambda s: (-s[0] * s[1], s))


# ----------------------------------------------------------------------------- timing

class Timer:
    """Median CUDA-event time of single launches, with the launch queue pre-filled."""

    def __init__(self, reps: int = 100, warmup: int = 10, rounds: int = 4):
        import torch

        self.torch = torch
        self.reps, self.warmup, self.rounds = reps, warmup, rounds
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        clock_khz = getattr(props, "clock_rate", 0) or 1_980_000
        self.cycles_per_ms = clock_khz

    def __call__(self, launch) -> dict:
        """launch(i) queues run i (rotate copies with i); returns {'median_ms', 'min_ms', ...}."""
        torch = self.torch
        for i in range(self.warmup):
            launch(i)
        torch.cuda.synchronize()
        per_round = max(1, self.reps // self.rounds)
        times = []
        i = 0
        for _ in range(self.rounds):
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(per_round)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(per_round)]
            # keep the GPU busy while the host queues the round (~40 us of host time per launch)
            torch.cuda._sleep(int(self.cycles_per_ms * (0.5 + 0.1 * per_round)))
            for r in range(per_round):
                starts[r].record()
                launch(i)
                ends[r].record()
                i += 1
            torch.cuda.synchronize()
            times += [s.elapsed_time(e) for s, e in zip(starts, ends)]
        return {"median_ms": statistics.median(times), "min_ms": min(times),
                "p90_ms": float(np.percentile(times, 90)), "runs": len(times)}


def copy_bandwidth(timer: Timer, nbytes: int = 2**30) -> dict:
    """Device-to-device copy (torch copy_ = cudaMemcpyAsync) of `nbytes`, counting bytes read +
    written; buffer pairs rotated like the weights when one pair would fit in L2."""
    torch = timer.torch
    pairs = copies_for(2 * nbytes) if nbytes < 2**28 else 1
    src = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda") for _ in range(pairs)]
    dst = [torch.empty_like(a) for a in src]
    t = timer(lambda i: dst[i % pairs].copy_(src[i % pairs]))
    del src, dst
    return {"bytes": 2 * nbytes, "median_ms": t["median_ms"], "gbps": 2 * nbytes / t["median_ms"] / 1e6}


# ----------------------------------------------------------------------------- data

def random_weight(fmt, k: int, n: int, group_size: int | None, seed: int, order: str | None = None) -> gpu.GpuWeight:
    """A GpuWeight with uniformly random codes and random fp16 scales in [0.002, 0.02), in `order`
    (gpu.upload's; None: as upload chooses)."""
    import cupy
    import torch

    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed)
    rb = row_bytes(fmt, k)
    payload = torch.randint(0, 256, (n, rb), dtype=torch.uint8, device="cuda", generator=gen)
    g, ngroups = groups_of(k, group_size)
    scales = (0.002 + 0.018 * torch.rand((n, ngroups), device="cuda", generator=gen)).to(torch.float16)
    return gpu.upload(payload=cupy.asarray(payload), scales=cupy.asarray(scales), scale_dtype="F16",
                      fmt=fmt, shape=(n, k), group_size=g, order=order)


def copies_for(nbytes: int) -> int:
    return max(MIN_COPIES, math.ceil(ROTATE_BYTES / max(nbytes, 1)))


# ----------------------------------------------------------------------------- benchmark

def git_commit(root: Path | None = None) -> str:
    """The source tree's short commit, with "-dirty" where tracked files differ from it (a tree
    copied over an older checkout shows as such, not as the older commit); EXMY_COMMIT overrides (a
    copied tree may have no .git)."""
    if os.environ.get("EXMY_COMMIT"):
        return os.environ["EXMY_COMMIT"]
    try:
        out = subprocess.run(["git", "describe", "--always", "--abbrev=7", "--dirty", "--exclude=*"],
                             cwd=root or Path(__file__).resolve().parents[3], capture_output=True, text=True,
                             timeout=30)
        return out.stdout.strip() if out.returncode == 0 else ""
    except Exception:
        return ""


def run(shapes=STANDARD_SHAPES, formats=NAMED, batches=BATCHES, group_size: int | None = None,
        reps: int = 100, dequant: bool = True, peers: bool = False, dtype: str = "float16", log=print) -> dict:
    """Run the whole benchmark; returns the JSON-ready result dict.

    ``dtype``: the activations' dtype, "float16" or "bfloat16" (x, y and the torch baseline's weights;
    the rows' ``torch_fp16_ms`` is then the bf16 baseline; models loaded in bf16 run the bf16 path).

    ``peers``: also time vLLM's Humming kernels (bench/peers.py) for the formats both support and its
    int4-g128, same timer, shapes, batches and rotation (rows "peers"; gemv rows gain humming_ms)."""
    import torch
    import torch.nn.functional as F

    if not gpu.available():
        raise ExmyError(f"no GPU: {gpu.unavailable_reason()}")
    fmts = [get_format(f) for f in formats]
    if dtype not in ("float16", "bfloat16"):
        raise ExmyError(f"activations are float16 or bfloat16, not {dtype!r}")
    act = getattr(torch, dtype)
    timer = Timer(reps=reps)
    info = gpu.device_info()
    result = {
        "device": info, "date": datetime.date.today().isoformat(), "commit": git_commit(),
        "torch": torch.__version__, "group_size": group_size, "reps": reps, "dtype": dtype,
        "method": "CUDA events per launch, queue pre-filled, medians; weights rotated over "
                  f">= {MIN_COPIES} copies and >= {ROTATE_BYTES >> 20} MiB",
    }
    if peers:
        reason = peer_kernels.unavailable_reason()
        if reason:
            raise ExmyError(f"--peers: {reason}")
        result["peers_version"] = {"humming-kernels": peer_kernels.version()}
    copy = copy_bandwidth(timer)
    result["copy"] = copy
    log(f"device: {info['name']} ({info['arch']}, {info['sms']} SMs, L2 {info['l2_bytes'] >> 20} MiB); "
        f"copy bandwidth {copy['gbps']:.0f} GB/s (read + write)")
    deq_rows, gemv_rows, peer_rows = [], [], []
    same_size_copy: dict[int, float] = {}
    seed = 1
    for k, n in shapes:
        label = shape_label(k, n)
        # torch fp16 baseline: weights rotated, one x per batch size
        w16_bytes = n * k * 2
        nw = copies_for(w16_bytes)
        w16 = [torch.randn(n, k, dtype=act, device="cuda") * 0.02 for _ in range(nw)]
        xs = {b: torch.randn(b, k, dtype=act, device="cuda") for b in batches}
        base = {}
        for b in batches:
            y = torch.empty(b, n, dtype=act, device="cuda")
            t = timer(lambda i, b=b, y=y: torch.matmul(xs[b], w16[i % nw].t(), out=y))
            t_lin = timer(lambda i, b=b: F.linear(xs[b], w16[i % nw]))
            base[b] = min(t["median_ms"], t_lin["median_ms"])
        del w16
        torch.cuda.empty_cache()
        peer_ms = {}  # (format, batch) -> Humming's median ms for this shape
        if peers:
            wanted = {f.name: peer_kernels.SAME_FORMAT[f.name] for f in fmts if f.name in peer_kernels.SAME_FORMAT
                      and group_size is None}
            for name, config in {**wanted, **peer_kernels.EXTRA}.items():
                seed += 1
                try:  # a peer that fails is reported, and our figures still come out
                    hw = peer_kernels.HummingWeights(k, n, config, copies_for, seed, act)
                    for b in batches:
                        y = torch.empty(b, n, dtype=act, device="cuda")
                        t = timer(hw.launcher(xs[b], y))
                        peer_ms[(name, b)] = t["median_ms"]
                        peer_rows.append({"shape": label, "k": k, "n": n, "peer": "humming", "format": name,
                                          "batch": b, "bits_per_weight": 8.0 * hw.nbytes / (n * k),
                                          "torch_fp16_ms": base[b], "peer_ms": t["median_ms"],
                                          "speedup": base[b] / t["median_ms"]})
                        log(f"humming {label:>12} {name} b={b:<2}: {t['median_ms'] * 1e3:7.1f} us  "
                            f"{base[b] / t['median_ms']:5.2f}x")
                    del hw
                except Exception as err:
                    result.setdefault("peer_errors", []).append(f"{label} {name}: {type(err).__name__}: {err}")
                    log(f"humming {label:>12} {name}: failed: {type(err).__name__}: {err}")
                torch.cuda.empty_cache()
        for fmt in fmts:
            w0 = random_weight(fmt, k, n, group_size, seed)
            seed += 1
            nq = copies_for(w0.nbytes)
            ws = [w0] + [random_weight(fmt, k, n, group_size, seed + j) for j in range(nq - 1)]
            seed += nq
            bpw = 8.0 * w0.nbytes / (n * k)  # bits per weight, scales included
            bound = 16.0 / bpw
            if dequant:
                import cupy

                nout = copies_for(n * k * 2)
                outs = [cupy.empty((n, k), dtype=cupy.float16) for _ in range(min(nout, nq))]
                dplans = [ws[i].dequant_plan(outs[i % len(outs)]) for i in range(nq)]
                t = timer(lambda i: dplans[i % nq]())
                moved = w0.nbytes + n * k * 2
                gbps = moved / t["median_ms"] / 1e6
                if moved not in same_size_copy:  # a copy moving as many bytes (same launch ramp/tail)
                    same_size_copy[moved] = copy_bandwidth(timer, moved // 2)["gbps"]
                row = {"shape": label, "k": k, "n": n, "format": fmt.name, "bits_per_weight": bpw,
                       "median_ms": t["median_ms"], "bytes": moved, "gbps": gbps,
                       "pct_copy": 100.0 * gbps / copy["gbps"],
                       "pct_copy_same_size": 100.0 * gbps / same_size_copy[moved]}
                deq_rows.append(row)
                log(f"dequant {label:>12} {fmt.name}: {t['median_ms'] * 1e3:8.1f} us  {gbps:7.0f} GB/s  "
                    f"{row['pct_copy']:5.1f}% of copy ({row['pct_copy_same_size']:5.1f}% of a copy of as many bytes)")
                del outs, dplans
            for b in batches:
                x = torch.randn(b, k, dtype=act, device="cuda")
                y = torch.empty(b, n, dtype=act, device="cuda")
                plans = [gpu.gemv_plan(x, w, y) for w in ws]
                t = timer(lambda i: plans[i % nq]())
                speedup = base[b] / t["median_ms"]
                row = {"shape": label, "k": k, "n": n, "format": fmt.name, "batch": b,
                       "bits_per_weight": bpw, "torch_fp16_ms": base[b], "exmy_ms": t["median_ms"],
                       "speedup": speedup, "bound": bound, "pct_bound": 100.0 * speedup / bound,
                       "weight_gbps": w0.nbytes / t["median_ms"] / 1e6, "kernel": plans[0].name}
                if (fmt.name, b) in peer_ms:
                    row["humming_ms"] = peer_ms[(fmt.name, b)]
                    row["vs_humming"] = peer_ms[(fmt.name, b)] / t["median_ms"]  # > 1: ours faster
                gemv_rows.append(row)
                log(f"gemv {label:>12} {fmt.name} b={b:<2}: torch {base[b] * 1e3:7.1f} us  exmy "
                    f"{t['median_ms'] * 1e3:7.1f} us  {speedup:5.2f}x  ({row['pct_bound']:5.1f}% of {bound:.2f}x)")
            del ws
            torch.cuda.empty_cache()
    result["dequant"] = deq_rows
    result["gemv"] = gemv_rows
    if peers:
        result["peers"] = peer_rows
    return result


# ----------------------------------------------------------------------------- output

def table(result: dict) -> str:
    lines = []
    copy = result["copy"]["gbps"]
    dev = result["device"]
    lines.append(f"{dev['name']} ({dev['arch']}), {result['date']}, commit {result.get('commit') or '?'}; "
                 f"copy {copy:.0f} GB/s")
    if result.get("dequant"):
        lines.append("")
        lines.append(f"{'dequant -> fp16':<16}{'shape':>14} {'us':>9} {'GB/s':>8} {'% copy':>7} {'% same-size copy':>17}")
        for r in result["dequant"]:
            same = r.get("pct_copy_same_size")
            lines.append(f"{r['format']:<16}{r['shape']:>14} {r['median_ms'] * 1e3:9.1f} {r['gbps']:8.0f} "
                         f"{r['pct_copy']:7.1f} {'' if same is None else f'{same:17.1f}'}")
    if result.get("gemv"):
        lines.append("")
        peers = "peers" in result
        lines.append(f"{'gemv':<8}{'shape':>14} {'batch':>5} {'fp16 us':>9} {'exmy us':>9} {'speedup':>8} "
                     f"{'bound':>6} {'% bound':>8}" + (f" {'humming us':>11} {'humming/exmy':>13}" if peers else ""))
        for r in result["gemv"]:
            line = (f"{r['format']:<8}{r['shape']:>14} {r['batch']:>5} {r['torch_fp16_ms'] * 1e3:9.1f} "
                    f"{r['exmy_ms'] * 1e3:9.1f} {r['speedup']:7.2f}x {r['bound']:5.2f}x {r['pct_bound']:7.1f}%")
            if peers and "humming_ms" in r:
                line += f" {r['humming_ms'] * 1e3:11.1f} {r['vs_humming']:12.2f}x"
            lines.append(line)
    others = [r for r in result.get("peers", []) if r["format"] not in {g["format"] for g in result.get("gemv", [])}]
    if others:
        lines.append("")
        lines.append(f"{'humming':<10}{'shape':>14} {'batch':>5} {'fp16 us':>9} {'humming us':>11} {'speedup':>8} "
                     f"{'bits/w':>7}")
        for r in others:
            lines.append(f"{r['format']:<10}{r['shape']:>14} {r['batch']:>5} {r['torch_fp16_ms'] * 1e3:9.1f} "
                         f"{r['peer_ms'] * 1e3:11.1f} {r['speedup']:7.2f}x {r['bits_per_weight']:7.2f}")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> bool:
    """Speedup over torch fp16 vs batch, one line per format, one panel per shape. False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    rows = result.get("gemv") or []
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        return False
    cols = min(3, len(shapes))
    nrows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        sub = [r for r in rows if r["shape"] == shape]
        for fmt in dict.fromkeys(r["format"] for r in sub):
            pts = sorted((r["batch"], r["speedup"]) for r in sub if r["format"] == fmt)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fmt)
            theirs = sorted((r["batch"], r["speedup"]) for r in result.get("peers", [])
                            if r["shape"] == shape and r["format"] == fmt)
            if theirs:  # the peer's kernel for the same format: same colour, dashed
                ax.plot([p[0] for p in theirs], [p[1] for p in theirs], ls="--", marker="x", color=line.get_color(),
                        label=f"{fmt} (Humming)")
        for fmt in dict.fromkeys(r["format"] for r in result.get("peers", []) if r["shape"] == shape):
            if fmt not in {r["format"] for r in sub}:
                pts = sorted((r["batch"], r["speedup"]) for r in result["peers"] if r["shape"] == shape and r["format"] == fmt)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=":", marker="x", color="gray",
                        label=f"{fmt} (Humming)")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch"] for r in sub}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(f"K->N = {shape}")
        ax.set_xlabel("batch")
        ax.set_ylabel("speedup vs torch fp16")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    dev = result["device"]["name"]
    fig.suptitle(f"exmyconv fused GEMV vs torch fp16 F.linear - {dev}, {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(result: dict, json_path: str | Path | None, png_path: str | Path | None) -> list[str]:
    written = []
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
        written.append(str(json_path))
    if png_path:
        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        if plot(result, png_path):
            written.append(str(png_path))
    return written
