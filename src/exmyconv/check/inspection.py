"""`exmyconv inspect`: what a checkpoint holds, at how many bits, with what error, and whether it is intact."""
from __future__ import annotations

from collections import Counter
from math import prod
from pathlib import Path

from ..io.checkpoint import Checkpoint
from ..io.validate import exmy_config, read_json
from ..format.dtypes import STORAGE
from ..format.fused import expert_stack
from ..format.layout import SEARCH_REPORT
from ..errors import ExmyError


# Said wherever a user starts (README, model card, inspect). Without the import, transformers would build
# the model with random weights in place of the quantized ones and only warn; the guard in a converted
# config.json (format.layout.GUARD_VALUE) turns that into an error that says what to do.
LOAD_HINT = "with transformers, `import exmyconv` first (it registers quant_method \"exmy\")"


def search_report(path) -> dict | None:
    """The sidecar `--format auto` writes, if PATH is a folder that has one."""
    side = Path(path) / SEARCH_REPORT
    if not side.is_file():
        return None
    try:
        return read_json(side)
    except ExmyError:
        return {"error": f"unreadable {SEARCH_REPORT}"}


def inspect_checkpoint(path: str) -> dict:
    with Checkpoint(path) as ckpt:
        problems = list(ckpt.problems)
        rows = []
        for name in ckpt.names():
            if name in ckpt.records:
                r, f = ckpt.records[name]
                nbytes = f.tensors[r.packed_name].nbytes + f.tensors[r.scale_name].nbytes
                group = "channel" if r.group_size == r.k else r.group_size
                rows.append({"name": name, "shape": list(r.shape), "format": r.fmt.name, "group": group,
                             "source_dtype": r.dtype, "scale_dtype": f.tensors[r.scale_name].dtype,
                             "scale_exp": r.scale_exp,
                             "params": r.numel, "bytes": nbytes, "bits": 8 * nbytes / r.numel,
                             "bits_nominal": r.nominal_bits,
                             "bits_codes": r.fmt.bits_per_weight, "bits_scales": 8 * r.scale_bytes * r.ngroups / r.k,
                             "rel_error": r.rel_error, "file": f.path.name})
            else:
                info, f = ckpt.plain[name]
                n = prod(info.shape)
                rows.append({"name": name, "shape": list(info.shape), "format": info.dtype, "group": None,
                             "params": n, "bytes": info.nbytes, "bits": 8 * STORAGE[info.dtype].itemsize,
                             "rel_error": None, "file": f.path.name})
        quant = [r for r in rows if r["rel_error"] is not None]
        qcfg = exmy_config(ckpt.config) or {}
        qparams = sum(r["params"] for r in quant)
        qbytes = sum(r["bytes"] for r in quant)
        worst = max(quant, key=lambda r: r["rel_error"]) if quant else None
        return {
            "path": str(ckpt.path),
            "kind": "exmy" if ckpt.is_exmy else "plain",
            "exmy_version": qcfg.get("format_version") or next(
                (f.metadata["exmy_version"] for f in ckpt.files if "exmy_version" in f.metadata), None),
            "model_type": (ckpt.config or {}).get("model_type"),
            "files": [f.path.name for f in ckpt.files],
            "file_bytes": sum(f.size for f in ckpt.files),
            "tensors": len(rows),
            "quantized_tensors": len(quant),
            "params": sum(r["params"] for r in rows),
            "quantized_params": qparams,
            "formats": dict(Counter(r["format"] if r["rel_error"] is None or r["group"] == "channel"
                                    else f"{r['format']}-g{r['group']}" for r in rows)),
            "bits_per_weight_quantized": 8 * qbytes / qparams if qparams else None,
            # the same as the formats and scales alone, and where the bits go (per quantized weight)
            "bits_per_weight_nominal": _mean(quant, "bits_nominal"),
            "bits_breakdown": {"codes": _mean(quant, "bits_codes"), "scales": _mean(quant, "bits_scales"),
                               "padding": 8 * qbytes / qparams - _mean(quant, "bits_nominal")} if qparams else None,
            "bits_per_weight_all": 8 * sum(r["bytes"] for r in rows) / max(1, sum(r["params"] for r in rows)),
            "mean_rel_error": sum(r["rel_error"] for r in quant) / len(quant) if quant else None,
            "worst_rel_error": {"name": worst["name"], "rel_error": worst["rel_error"]} if worst else None,
            "search": search_report(ckpt.path) if ckpt.path.is_dir() else None,
            "expert_stacks": _expert_stacks(rows),
            "intact": not problems,
            "problems": problems,
            "tensor_table": rows,
        }


def _expert_stacks(rows: list[dict]) -> dict | None:
    """MoE expert stacks (format/fused.py) and those whose members differ in format, group size or scale
    choice, or are partly unquantized: loaders cannot stack those, so they decode that layer at load."""
    stacks: dict = {}
    for r in rows:
        key = expert_stack(r["name"])
        if key is not None:
            stacks.setdefault(key, set()).add((r["format"], r["group"], r.get("scale_dtype"), r.get("scale_exp")))
    if not stacks:
        return None
    mixed = [key.split(":", 1)[1] + (".*.gate/up" if key.startswith("experts0") else ".*.down")
             for key, kinds in stacks.items() if len(kinds) > 1]
    return {"stacks": len(stacks), "mixed": sorted(mixed)}


def _mean(rows: list[dict], key: str) -> float | None:
    """The mean of ``key`` over rows weighted by their parameters (None without rows)."""
    n = sum(r["params"] for r in rows)
    return sum(r[key] * r["params"] for r in rows) / n if n else None


def plot_tradeoff(report: dict, png: str) -> None:
    """The model's error-vs-bits curve from the search sidecar, with the chosen point."""
    search = report.get("search")
    if not search or "tradeoff" not in search:
        raise ExmyError(f"{report['path']}: no format search to plot (converted without --format auto)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ExmyError("--plot needs matplotlib: pip install matplotlib") from None
    curve = search["tradeoff"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["bits"] for p in curve], [p["mean_rel_mse"] for p in curve], "o-", ms=3, label="optimal allocations")
    ax.plot([search["achieved_bits"]], [search["mean_rel_mse"]], "r*", ms=12, label="chosen")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (scales included)")
    ax.set_ylabel(f"mean {search['objective']}")
    ax.set_title(Path(report["path"]).name)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def render(report: dict) -> str:
    lines = [f"{report['path']}: {report['kind']} checkpoint"
             + (f" (layout {report['exmy_version']})" if report["exmy_version"] else "")
             + (f", model_type {report['model_type']}" if report["model_type"] else ""),
             f"  files: {len(report['files'])} ({_mb(report['file_bytes'])})",
             f"  tensors: {report['tensors']} ({report['quantized_tensors']} quantized), "
             f"parameters: {report['params'] / 1e6:.2f} M ({report['quantized_params'] / 1e6:.2f} M quantized)",
             "  formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(report["formats"].items()))]
    if report["bits_per_weight_quantized"] is not None:
        w = report["worst_rel_error"]
        b = report["bits_breakdown"]
        lines += [f"  bits/weight: {report['bits_per_weight_quantized']:.3f} effective (as stored), "
                  f"{report['bits_per_weight_nominal']:.3f} nominal, per quantized weight; "
                  f"{report['bits_per_weight_all']:.2f} over all tensors",
                  f"    effective = codes {b['codes']:.3f} + scales {b['scales']:.3f} + padding {b['padding']:.3f} "
                  "(rows padded to a multiple of 32 weights, shared-bit planes to 4 bytes); nominal = codes + scales",
                  f"  relative error: mean {report['mean_rel_error']:.4f}, worst {w['rel_error']:.4f} ({w['name']})"]
    else:
        lines.append(f"  bits/weight: {report['bits_per_weight_all']:.2f}")
    search = report.get("search")
    if search and "achieved_bits" in search:
        target = (f"budget {search['budget_bits']} bits" if search.get("budget_bits") is not None
                  else f"max error {search.get('max_error')}")
        lines.append(f"  format search: {search['objective']}, {target} -> {search['achieved_bits']:.3f} bits, "
                     f"{len(search['candidates'])} candidates ({SEARCH_REPORT})")
    stacks = report.get("expert_stacks")
    if stacks:
        mixed = stacks["mixed"]
        lines.append(f"  MoE expert stacks: {stacks['stacks']}, " + (
            "each in one format and scale choice (transformers and vLLM keep the experts packed)" if not mixed else
            f"{len(mixed)} mixed (formats, group sizes or scales differ, or partly unquantized; transformers and "
            f"vLLM decode those layers at load), e.g. {mixed[0]}"))
    if report["kind"] == "exmy":
        lines.append(f"  load: {LOAD_HINT}; or exmyconv.load_state_dict, or `exmyconv dequantize` to plain")
    lines.append("  integrity: OK" if report["intact"] else
                 f"  integrity: {len(report['problems'])} problem(s)\n" + "\n".join(f"    - {p}" for p in report["problems"]))
    width = max((len(r["name"]) for r in report["tensor_table"]), default=4)
    lines.append("")
    lines.append(f"  {'name':<{width}}  {'shape':<16} {'format':<6} {'group':<7} {'bits':>6} {'nominal':>7} "
                 f"{'rel_err':>8}")
    for r in report["tensor_table"]:
        err = f"{r['rel_error']:.4f}" if r["rel_error"] is not None else "-"
        group = str(r["group"]) if r["group"] is not None else "-"
        nominal = f"{r['bits_nominal']:.2f}" if "bits_nominal" in r else "-"
        shape = "x".join(map(str, r["shape"])) or "scalar"
        lines.append(f"  {r['name']:<{width}}  {shape:<16} {r['format']:<6} {group:<7} {r['bits']:>6.2f} {nominal:>7} "
                     f"{err:>8}")
    return "\n".join(lines)
