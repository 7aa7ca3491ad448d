"""What `exmyconv quantize` prints: the run's summary, or with --dry-run the plan; as text or as JSON data."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..format.layout import SEARCH_REPORT
from .output import plural


def summary_data(s) -> dict:
    """A pipeline.Summary (of a run or of a dry run) as the JSON object `quantize --json` prints."""
    name, worst = s.worst
    data = {"dry_run": s.plan is not None, "out_dir": s.out_dir, "format": s.format, "tensors": s.tensors,
            "quantized": s.quantized, "quantized_weights": s.quantized_weights,
            "bits_per_weight": s.bits_per_weight, "bits_per_weight_nominal": s.nominal_bits_per_weight,
            "source_bytes": s.source_bytes, "output_bytes": s.output_bytes, "shards": s.shards,
            "seconds": s.seconds, "mean_error": s.mean_error if s.errors else None,
            "worst_error": {"name": name, "rel_error": worst} if s.errors else None,
            "errors": s.errors, "formats": s.formats, "kept": s.kept, "tied": s.tied,
            "search": s.search, "search_seconds": s.search_seconds if s.search else None}
    if s.plan is not None:
        data["plan"] = s.plan
    return data


def group_text(opts) -> str:
    """How the run's scales are grouped, from its pipeline.Options."""
    if opts.auto:
        return "per-tensor search"
    return f"groups of {opts.group_size}" if opts.group_size else "one scale per channel"


def _bits_lines(s) -> list[str]:
    lines = [f"  bits/weight: {s.bits_per_weight:.3f} effective (scales and row padding included), "
             f"{s.nominal_bits_per_weight:.3f} nominal, over {s.quantized_weights / 1e6:.2f} M weights",
             f"  size: {s.source_bytes / 1e6:.1f} MB -> {s.output_bytes / 1e6:.1f} MB"]
    return lines


def curve_points(curve: list[dict], points: int = 8) -> list[str]:
    """At most ``points`` points of the error-vs-bits curve as printed ('4.25: 1.1e-02'), spread evenly
    over it, no point twice: points that print the same bits are one (the one with the least error)."""
    distinct: dict[str, dict] = {}
    for p in curve:
        key = f"{p['bits']:.2f}"
        if key not in distinct or p["mean_rel_mse"] < distinct[key]["mean_rel_mse"]:
            distinct[key] = p
    shown = list(distinct.values())
    if len(shown) > points:
        shown = [shown[round(i * (len(shown) - 1) / (points - 1))] for i in range(points)]
    return [f"{p['bits']:.2f}: {p['mean_rel_mse']:.1e}" for p in shown]


def _search_lines(s, sidecar: str | None) -> list[str]:
    r = s.search
    if not r:
        return []
    target = f"budget {r['budget_bits']} bits" if r["budget_bits"] is not None else f"max error {r['max_error']}"
    lines = [f"  search ({r['objective']}, {target}, {s.search_seconds:.1f} s on {r['measured_on']}): "
             f"{r['achieved_bits']:.3f} bits/weight, mean rel. MSE {r['mean_rel_mse']:.3e}; chosen: "
             + ", ".join(f"{k} x{v}" for k, v in Counter(s.formats.values()).most_common()),
             "  error vs bits, whole model (bits: mean rel. MSE): " + "  ".join(curve_points(r["tradeoff"]))]
    if sidecar:
        lines.append(f"  details: {sidecar}")
    return lines


def kept_lines(s) -> list[str]:
    """The warning about weights left unquantized (stderr)."""
    if not s.kept:
        return []
    width = max(map(len, s.kept))
    return [f"warning: {plural(len(s.kept), 'weight')} left unquantized:",
            *(f"  {name:<{width}}  {why}" for name, why in s.kept.items())]


def summary_text(s, group: str) -> str:
    """The summary of a finished run (kept weights and the final 'wrote' line apart)."""
    rate = s.quantized_weights / s.seconds / 1e6 if s.seconds else 0.0
    lines = [f"quantized {s.quantized}/{s.tensors} tensors to {s.format} ({group}) "
             f"in {s.seconds:.2f} s ({rate:.1f} M weights/s)", *_bits_lines(s)]
    if s.errors:
        name, worst = s.worst
        lines.append(f"  relative error: mean {s.mean_error:.4f}, worst {worst:.4f} ({name})")
    lines += _search_lines(s, str(Path(s.out_dir) / SEARCH_REPORT))
    lines += [f"  {head} is tied to {emb} (identical): stored once, re-tied on load" for head, emb in s.tied.items()]
    return "\n".join(lines)


def plan_text(s, group: str) -> str:
    """`quantize --dry-run`: the totals, the search (auto), and per tensor what the run would do."""
    lines = [f"dry run: would quantize {s.quantized}/{s.tensors} tensors to {s.format} ({group}) and write "
             f"{s.out_dir} ({plural(s.shards, 'shard')}); nothing written (planned in {s.seconds:.2f} s)",
             *_bits_lines(s), *_search_lines(s, None)]
    for head, emb in s.tied.items():
        lines.append(f"  {head} is tied to {emb} (identical): would be stored once, re-tied on load")
    rows = [r for r in s.plan if r["action"] != "tied"]
    choices = (s.search or {}).get("tensors", {})
    width = max((len(r["name"]) for r in rows), default=4)
    auto = bool(choices)
    head = (f"  {'name':<{width}}  {'shape':<16} {'format':<7} {'group':<7} {'bits':>6} {'nominal':>7} {'bytes':>11}"
            + ("  pred. error" if auto else ""))
    lines += ["", head]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        if r["action"] == "quantize":
            line = (f"  {r['name']:<{width}}  {shape:<16} {r['format']:<7} {str(r['group']):<7} {r['bits']:>6.2f} "
                    f"{r['bits_nominal']:>7.2f} {r['bytes']:>11,}")
            if auto:
                option = next(o for o in choices[r["name"]]["options"]
                              if o["candidate"] == choices[r["name"]]["choice"])
                line += f"  {option['rel_mse'] ** 0.5:11.4f}"
        else:
            line = f"  {r['name']:<{width}}  {shape:<16} {r['dtype']:<7} {'-':<7} {'':>6} {'':>7} {r['bytes']:>11,}" \
                   f"  kept: {r['reason']}"
        lines.append(line)
    return "\n".join(lines)
