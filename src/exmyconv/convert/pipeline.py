"""Conversion as a visible stream: read tensor -> plan -> quantize -> pack -> write.

Source tensors are memory-mapped one at a time and processed in row chunks, so peak memory is
about one source tensor plus a fixed working set, whatever the model size. Everything is written
into a temporary sibling of OUT_DIR that replaces it only when the whole run succeeded.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .._version import __version__

from ..format import dtypes

from . import resume as resumes, search, units
from ..errors import ExmyError, Interrupted
from ..format.exmy import DEFAULT, get_format
from ..format.fused import expert_stack
from ..format.layout import (CONFIG_FILE, GUARD_KEY, GUARD_VALUE, QUANT_METHOD, SEARCH_REPORT, VERSION, TensorRecord,
                             shard_name)
from ..io.output import atomic_dir, check_out_dir, copy_side_files, write_index
from ..format.pack import pack_codes
from . import gptq
from ..format.quant import (choose_scale_dtype, group_amax, groups_of, quantize_rows, relative_error, scale_exponent,
                            squared_error)
from ..io.source import Source, open_source
from ..io.reader import TensorInfo
from ..io.writer import ShardWriter

CHUNK_ELEMENTS = 1 << 21  # elements of float32 work per step (~8 MB)
WORKERS = min(4, os.cpu_count() or 1)
EMBEDDINGS = re.compile(r"(embed|lm_head|(^|\.)(wte|wpe|shared)\.)")
# MoE routers (Qwen-MoE and DeepSeek mlp.gate, Mixtral block_sparse_moe.gate, gpt-oss mlp.router, Qwen2-MoE
# shared_expert_gate): tiny, and the tensor whose error costs most (it picks the experts); not dense
# MLPs' gate_proj
ROUNDINGS = ("nearest", "gptq")
SCALES = ("16", "e4m3")  # --scales: fp16/bf16 (chosen per tensor) or 8-bit
ROUTERS = re.compile(r"(^|\.)(gate|router|shared_expert_gate)\.weight$")


@dataclass
class Options:
    format: str = DEFAULT
    group_size: int | None = None  # None: one scale per row
    skip: tuple[str, ...] = ()  # regexes of tensor names to keep unquantized
    quantize_embeddings: bool = False
    quantize_routers: bool = False
    max_shard_size: int = 5 * 10**9
    clip_search: bool = False
    bits: float | None = None  # --format auto: average bits per quantized weight, scales included
    max_error: float | None = None  # --format auto: per-tensor relative error bound instead
    candidates: str | None = None  # --format auto: comma-separated candidate list
    tie_fused: bool = True  # --format auto: one format for the tensors engines fuse (format.fused.fused_weight)
    calibration: str | None = None  # text file: activation-weighted errors
    calibration_tokens: int = 4096
    rounding: str = "nearest"  # or "gptq": errors compensated through the calibration Hessians (convert/gptq.py)
    scales: str = "16"  # or "e4m3": 8-bit group scales times a power of two per tensor (SPEC section 2)

    def __post_init__(self):
        self.auto = self.format.strip().lower() == "auto"
        self.fmt = get_format(DEFAULT if self.auto else self.format)
        if self.auto and (self.bits is None) == (self.max_error is None):
            raise ExmyError("--format auto needs exactly one of --bits and --max-error")
        if self.max_error is not None and not 0 <= self.max_error < float("inf"):
            raise ExmyError("--max-error must be a number >= 0 (0: the most accurate candidate)")
        if not self.auto and (self.bits is not None or self.max_error is not None or self.candidates):
            raise ExmyError("--bits, --max-error and --candidates go with --format auto")
        if self.group_size is not None and self.group_size < 1:
            raise ExmyError(f"--group-size must be positive, got {self.group_size}")
        if self.max_shard_size < 1:
            raise ExmyError("--max-shard-size must be positive")
        if self.calibration_tokens < 1:
            raise ExmyError(f"--calibration-tokens must be positive, got {self.calibration_tokens}")
        if self.scales not in SCALES:
            raise ExmyError(f"--scales must be one of {', '.join(SCALES)}, got {self.scales!r}")
        self.scales8 = self.scales == "e4m3"
        if self.rounding not in ROUNDINGS:
            raise ExmyError(f"--rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.rounding == "gptq" and not self.calibration:
            raise ExmyError("--rounding gptq needs --calibration TEXT_FILE (its errors are weighed by the "
                            "model's activations on that text)")
        try:
            self.skip_patterns = [re.compile(p) for p in self.skip]
        except re.error as err:
            raise ExmyError(f"bad --skip regex: {err}") from None


@dataclass
class Item:
    """One source tensor and what becomes of it."""

    info: TensorInfo
    file: object
    record: TensorRecord | None = None  # None: kept as is
    reason: str = ""  # why it is kept
    clip_search: bool = False
    importance: np.ndarray | None = None  # per input channel, from calibration
    hessian: np.ndarray | None = None  # [K, K] of the inputs, from calibration: --rounding gptq

    @property
    def outputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        r = self.record
        if r is None:
            return [(self.info.name, self.info.dtype, self.info.shape)]
        # The scale dtype is only known after the amax pass; both are 2 bytes, and BF16 is the
        # longer name, so the header can shrink to F16 in place.
        # (16-bit scales: the writer is told F16 or BF16 once they are known; same size)
        scale_dtype = "F8_E4M3" if r.scale_exp is not None else "BF16"
        return [(r.packed_name, "U8", r.packed_shape), (r.scale_name, scale_dtype, r.scale_shape)]

    @property
    def out_bytes(self) -> int:
        return sum(int(np.prod(s)) * dtypes.STORAGE[d].itemsize for _, d, s in self.outputs)


@dataclass
class Summary:
    out_dir: str
    format: str
    tensors: int = 0
    quantized: int = 0
    quantized_weights: int = 0
    quantized_bytes: int = 0  # payload + scales
    source_bytes: int = 0
    output_bytes: int = 0
    shards: int = 0
    seconds: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)  # rel_error per quantized tensor
    formats: dict[str, str] = field(default_factory=dict)  # chosen format per quantized tensor
    search: dict | None = None  # --format auto: the search report (also OUT_DIR/SEARCH_REPORT)
    search_seconds: float = 0.0
    tied: dict[str, str] = field(default_factory=dict)  # lm_head stored once with its embedding
    kept: dict[str, str] = field(default_factory=dict)  # unquantized >=2-D float tensor -> reason
    quantized_nominal_bits: float = 0.0  # sum over quantized tensors of numel x nominal bits (no row padding)
    plan: list[dict] | None = None  # dry_run: per tensor, what the run would do (plan_rows)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_weights, 1)

    @property
    def nominal_bits_per_weight(self) -> float:
        """Bits per quantized weight of the formats and scales alone (without the layout's row padding)."""
        return self.quantized_nominal_bits / max(self.quantized_weights, 1)

    @property
    def mean_error(self) -> float:
        return float(np.mean(list(self.errors.values()))) if self.errors else 0.0

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.errors.items(), key=lambda kv: kv[1]) if self.errors else ("", 0.0)


def plan(source: Source, opts: Options) -> list[Item]:
    items = []
    for info, file in source.tensors:
        item = Item(info, file)
        if info.dtype not in dtypes.FLOAT:
            item.reason = f"dtype {info.dtype}"
        elif len(info.shape) < 2:
            item.reason = "1-D"
        elif len(info.shape) > 3:
            item.reason = f"{len(info.shape)}-D"
        elif 0 in info.shape:
            item.reason = "empty"
        elif any(p.search(info.name) for p in opts.skip_patterns):
            item.reason = "--skip"
        elif not opts.quantize_embeddings and EMBEDDINGS.search(info.name):
            item.reason = "embedding/lm_head (use --quantize-embeddings)"
        elif not opts.quantize_routers and ROUTERS.search(info.name):
            item.reason = "MoE router (use --quantize-routers)"
        else:
            g, _ = groups_of(info.shape[-1], opts.group_size)
            item.record = TensorRecord(info.name, opts.fmt, info.shape, info.dtype, g,
                                       scale_exp=0 if opts.scales8 else None)
            item.clip_search = opts.clip_search
        items.append(item)
    return items


def tied_duplicates(source: Source, items: list[Item]) -> dict[str, str]:
    """lm_head weights stored as byte-identical copies of an embedding in a model whose config
    ties them: {lm_head name: embedding name}. They are written once (the loader re-ties)."""
    if not (source.config or {}).get("tie_word_embeddings", True):
        return {}
    embeddings = [i for i in items if "embed" in i.info.name and len(i.info.shape) == 2]
    tied = {}
    for head in (i for i in items if i.info.name.endswith("lm_head.weight")):
        for emb in embeddings:
            if (emb.info.dtype, emb.info.shape) == (head.info.dtype, head.info.shape) and _same_bytes(emb, head):
                tied[head.info.name] = emb.info.name
                break
    return tied


def _same_bytes(a: Item, b: Item, step: int = 16 << 20) -> bool:
    """Compare two tensors' stored bytes piece by piece, stopping at the first difference."""
    x = a.file.read(a.info.name).reshape(-1).view(np.uint8)
    y = b.file.read(b.info.name).reshape(-1).view(np.uint8)
    return all(x[i:i + step].tobytes() == y[i:i + step].tobytes() for i in range(0, x.size, step))


def progress_label(name: str, width: int = 40) -> str:
    """A tensor name for the progress bar, at most ``width`` characters, cut at dots, never inside a
    part: the end of the name (the module and the parameter) and, if it does not fit whole, the first
    number before it (the layer) — 'encoder.layer.1.attention.output.dense.weight' becomes
    '…layer.1.attention.output.dense.weight', 'model.layers.10.block_sparse_moe.experts.7.w1.weight'
    becomes 'layers.10 … experts.7.w1.weight'."""
    if len(name) <= width:
        return name
    parts = name.split(".")

    def tail(room: int, stop: int = 0) -> list[str]:
        kept: list[str] = []
        for part in reversed(parts[stop:]):
            if len(".".join([part, *kept])) > room:
                break
            kept.insert(0, part)
        return kept

    end = tail(width - 1)
    if not end:  # one part longer than the width: its end
        return "…" + name[-(width - 1):]
    first_number = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    start = len(parts) - len(end)
    if first_number is None or first_number == 0 or first_number - 1 >= start:
        return "…" + ".".join(end)
    head = ".".join(parts[first_number - 1:first_number + 1])
    rest = tail(width - len(head) - 3, first_number + 1)
    return f"{head} … {'.'.join(rest)}" if rest else "…" + ".".join(end)


def float_chunks(item: Item):
    """A callable giving the tensor's rows as float32 chunks (NaN/Inf refused)."""
    def chunks():
        rows = item.file.read(item.info.name).reshape(-1, item.info.shape[-1])
        for chunk in _row_chunks(rows):
            x = dtypes.to_float32(chunk, item.info.dtype)
            if not np.isfinite(x).all():
                raise ExmyError(f"tensor {item.info.name!r} contains NaN or Inf")
            yield x
    return chunks


def calibrate(source: Source, items: list[Item], opts: Options) -> None:
    """--calibration: each quantized item's importance per input channel, from the model run on the text."""
    if not opts.calibration:
        return
    from .calibration import activation_covariances, activation_moments, match

    names = [item.info.name for item in items if item.record]
    if opts.rounding == "gptq":  # --rounding gptq: the whole second moment, its diagonal the importance
        # one array (and one inverse-Hessian factor, gptq.cached_factor) for the linears fed one input (q/k/v, gate/up)
        distinct: dict[bytes, np.ndarray] = {}
        hessians = {name: distinct.setdefault(hashlib.sha256(h.tobytes()).digest(), h) for name, h in
                    match(activation_covariances(source.root, opts.calibration, opts.calibration_tokens), names).items()}
        diagonals = {id(h): np.diagonal(h).copy() for h in hessians.values()}
        matched = {name: diagonals[id(h)] for name, h in hessians.items()}
    else:
        matched = match(activation_moments(source.root, opts.calibration, opts.calibration_tokens), names)
    for item in items:
        if item.record:
            item.importance = matched[item.info.name]
            if opts.rounding == "gptq":
                item.hessian = hessians[item.info.name]


def choose_formats(items: list[Item], opts: Options, progress, journal: "resumes.Journal | None" = None,
                   runner=None) -> dict:
    """--format auto: measure every candidate on every tensor (curves already in the journal are
    kept; the runner, default ``Local()``, measures the rest), allocate, set each record. Without a
    journal (``dry_run``) nothing is recorded."""
    cands = search.parse_candidates(opts.candidates, opts.clip_search, opts.scales8)
    todo = [i for i in items if i.record]
    sizes = [np.array([c.nbytes(i.info.shape) for c in cands], dtype=np.float64) for i in todo]
    numels = [i.record.numel for i in todo]
    if opts.bits is not None:  # refuse an impossible budget before the long part
        search.check_budget(sizes, opts.bits * sum(numels) / 8, sum(numels))
    runner = runner or Local()
    curves = dict(journal.curves) if journal is not None else {}
    progress.update(sum(i.info.nbytes for i in todo if i.info.name in curves))
    for item, errors, measured_on in runner.measure(
            [i for i in todo if i.info.name not in curves], cands, progress):
        if journal is not None:
            journal.add_curve(item.info.name, errors, measured_on)
        curves[item.info.name] = (errors, measured_on)
    errs = [curves[i.info.name][0] for i in todo]
    where = ", ".join(sorted({curves[i.info.name][1] for i in todo})) or search.measure_backend(opts.scales8)[1]
    weighted = [n * e for n, e in zip(numels, errs)]
    # The allocation runs over groups: a tied group (q/k/v, gate/up) is one choice, its size and error the sums.
    groups = (search.fused_groups([i.info.name for i in todo], [i.info.shape for i in todo]) if opts.tie_fused
              else [[j] for j in range(len(todo))])
    gsizes = [sum(sizes[j] for j in g) for g in groups]
    gweighted = [sum(weighted[j] for j in g) for g in groups]
    if opts.bits is not None:
        gpicks, lam = search.allocate(gsizes, gweighted, opts.bits * sum(numels) / 8)
    else:
        lam = None
        gpicks = []
        for g, s, e in zip(groups, gsizes, gweighted):
            ok = [c for c in range(len(cands)) if all(np.sqrt(errs[j][c]) <= opts.max_error for j in g)]
            gpicks.append(min(ok, key=lambda c: s[c]) if ok else int(np.argmin(e)))
    picks = [0] * len(todo)
    for g, p in zip(groups, gpicks):
        for j in g:
            picks[j] = p
    report = {"objective": "activation-weighted relative MSE" if opts.calibration else "relative weight MSE",
              "rounding": {"measured": "nearest", "written": opts.rounding},
              "calibration": opts.calibration and Path(opts.calibration).name,
              "budget_bits": opts.bits, "max_error": opts.max_error, "lambda": lam,
              "measured_on": where,
              "candidates": [c.name for c in cands],
              "tie_fused": opts.tie_fused,
              "fused_groups": [[todo[j].info.name for j in g] for g in groups if len(g) > 1],
              "tensors": {}}
    for item, s, e, p in zip(todo, sizes, errs, picks):
        c = cands[p]
        g, _ = groups_of(item.info.shape[-1], c.group_size)
        item.record = TensorRecord(item.info.name, c.fmt, item.info.shape, item.info.dtype, g,
                                   scale_exp=0 if opts.scales8 else None)
        item.clip_search = c.clip
        report["tensors"][item.info.name] = {
            "numel": item.record.numel, "choice": c.name,
            "options": [{"candidate": cand.name, "bits": 8 * s[j] / item.record.numel,
                         "rel_mse": float(e[j])} for j, cand in enumerate(cands)]}
    total = sum(numels)
    report["achieved_bits"] = 8 * sum(float(s[p]) for s, p in zip(sizes, picks)) / total
    report["mean_rel_mse"] = sum(float(w[p]) for w, p in zip(weighted, picks)) / total
    if opts.bits is not None:  # the allocation is never worse than this; when it is this, it says so
        single = search.best_single(gsizes, gweighted, opts.bits * total / 8)
        report["best_single"] = None if single is None else {
            "candidate": cands[single].name, "bits": 8 * sum(float(s[single]) for s in sizes) / total,
            "mean_rel_mse": sum(float(w[single]) for w in weighted) / total, "chosen": gpicks == [single] * len(groups)}
    report["tradeoff"] = search.tradeoff(gsizes, gweighted, [sum(numels[j] for j in g) for g in groups])
    return report


def measure_items(items: list[Item], candidates, progress):
    """(item, its error curve over the candidates, where it was measured), item by item."""
    measure, where = search.measure_backend(any(c.scales8 for c in candidates))
    for item in items:
        progress.set_postfix_str(item.info.name[-40:], refresh=False)
        # --rounding gptq too: nearest rounding's activation-weighted errors choose better than GPTQ's
        # own output errors (docs/quality.md, "auto with GPTQ's errors")
        errors = measure(float_chunks(item), candidates, item.importance)
        yield item, errors, where
        progress.update(item.info.nbytes)


def assign_shards(items: list[Item], max_bytes: int) -> list[list[Item]]:
    """Output shards by bytes, fused partners together (convert/units.py)."""
    plan = units.pack([i.info.name for i in items], [i.out_bytes for i in items], max_bytes)
    return [[items[j] for j in shard] for shard in plan]


def _row_chunks(rows: np.ndarray):
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        yield rows[start:start + step]


def ordered_map(fn, items, workers: int | None = None):
    """fn over items on a few threads (numpy releases the GIL; default WORKERS), results in order,
    bounded look-ahead."""
    workers = WORKERS if workers is None else workers
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def scan_item(item: Item) -> np.ndarray:
    """Pass 1 over a tensor: every group's absmax (the scales' range); NaN/Inf refused."""
    r = item.record
    rows = item.file.read(item.info.name).reshape(-1, r.k)

    def scan(chunk):
        x = dtypes.to_float32(chunk, r.dtype)
        if not np.isfinite(x).all():
            raise ExmyError(f"tensor {r.name!r} contains NaN or Inf")
        return group_amax(x, r.group_size, r.ngroups)

    return np.concatenate(list(ordered_map(scan, _row_chunks(rows))))


def scale_choice(amax: np.ndarray, record: TensorRecord) -> tuple[str, int | None]:
    """The stored scale dtype for groups of this absmax, and with 8-bit scales the power of two t
    (e4m3 scales of x * 2^-t, exact), else None."""
    if record.scale_exp is not None:
        return "F8_E4M3", scale_exponent(amax, record.fmt)
    return choose_scale_dtype(amax, record.fmt), None


def stack_scales(items: list[Item]) -> dict[str, tuple[str, int | None]]:
    """One scale choice per expert stack of a shard (format.fused.expert_stack: a MoE layer's gate/up or down
    projections of every expert, of one format and group size; a shard holds its whole MoE layer),
    made over all its members' groups, so that the stack loads as one tensor (transformers'
    ExmyExperts). {tensor name: scale_choice}; a scan pass over those members."""
    stacks: dict = {}
    for item in items:
        r = item.record
        stack = r and expert_stack(r.name)
        if stack:
            stacks.setdefault((stack, r.fmt.name, r.group_size, r.scale_exp is None), []).append(item)
    out = {}
    for members in stacks.values():
        # (the choice depends on the smallest non-zero and the largest group absmax only, and both rules are
        # monotone: two numbers per member, not every group of a stack that may hold gigabytes)
        extremes = [_extremes(scan_item(item)) for item in members]
        choice = scale_choice(np.concatenate(extremes), members[0].record)
        out.update((item.info.name, choice) for item in members)
    return out


def _extremes(amax: np.ndarray) -> np.ndarray:
    nonzero = amax[amax > 0]
    return np.array([nonzero.min(), nonzero.max()], dtype=np.float32) if nonzero.size else np.zeros(1, np.float32)


def quantize_item(item: Item, writer: ShardWriter, opts: Options, progress,
                  scale: tuple[str, int | None] | None = None) -> str:
    """Stream one tensor through quantize -> pack -> write, with ``scale`` (a scale_choice) if given,
    else its own. Returns its scale dtype."""
    r = item.record
    rows = item.file.read(item.info.name).reshape(-1, r.k)
    g = r.group_size
    scale_dtype, t = scale or scale_choice(scan_item(item), r)
    if t is not None:
        r.scale_exp = t
    unit = np.float32(2.0 ** -(r.scale_exp or 0))
    factor = None if item.hessian is None else gptq.cached_factor(item.hessian)
    gptq_rows = search.rounding_backend(r.scale_exp is not None)[0]

    def encode(chunk):  # pass 2: quantize and pack
        x = dtypes.to_float32(chunk, r.dtype) * unit
        if factor is None:
            codes, s = quantize_rows(x, r.fmt, g, scale_dtype, item.clip_search, item.importance)
        else:
            codes, s = gptq_rows(x, r.fmt, g, scale_dtype, factor, item.clip_search, item.importance)
        return pack_codes(codes, r.fmt), s, squared_error(x, codes, s, r.fmt, g), chunk.nbytes

    scales, sq_err, sq_ref = [], 0.0, 0.0
    for packed, s, (err, ref), nbytes in ordered_map(encode, _row_chunks(rows)):
        writer.write(r.packed_name, packed)
        scales.append(s)
        sq_err, sq_ref = sq_err + err, sq_ref + ref
        progress.update(nbytes)
    writer.write(r.scale_name, dtypes.store(np.concatenate(scales), scale_dtype))
    r.rel_error = relative_error(sq_err, sq_ref)  # (a ratio: the same in x's units)
    return scale_dtype


def copy_item(item: Item, writer: ShardWriter, progress) -> None:
    flat = item.file.read(item.info.name).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, 64 << 20):
        writer.write(item.info.name, flat[start:start + (64 << 20)])
        progress.update(min(64 << 20, flat.size - start))


def write_shard(path: Path, items: list[Item], opts: Options, progress) -> None:
    entries = [e for item in items for e in item.outputs]
    metadata = {"format": "pt", "exmy_version": VERSION}
    metadata.update(item.record.metadata() for item in items if item.record)
    writer = ShardWriter(path, entries, metadata)
    try:
        scale_dtypes = {}
        shared = stack_scales(items)
        for item in items:
            progress.set_postfix_str(progress_label(item.info.name), refresh=False)
            if item.record:
                scale_dtypes[item.record.scale_name] = quantize_item(item, writer, opts, progress,
                                                                     shared.get(item.info.name))
            else:
                copy_item(item, writer, progress)
        writer.close(dict(item.record.metadata() for item in items if item.record), scale_dtypes)
    except BaseException:
        writer.abort()
        raise


def unit_digest(items: list[Item]) -> str:
    """What a shard's bytes follow from in the plan (names, shapes, dtypes, formats, clipping)."""
    plan = [[i.info.name, i.info.dtype, list(i.info.shape), i.record and i.record.fmt.name,
             i.record and i.record.group_size, i.clip_search] for i in items]
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()


def write_unit(folder: Path, name: str, items: list[Item], opts: Options, progress, expect: dict | None = None) -> dict:
    """Write one output shard, or keep it if ``expect`` (its journal record) still matches plan and
    file; returns its journal record (resume.py)."""
    path, digest = Path(folder) / name, unit_digest(items)
    if expect and expect.get("digest") == digest and resumes.file_matches(path, expect):
        progress.update(sum(i.info.nbytes for i in items))
        return expect
    write_shard(path, items, opts, progress)
    return {"shard": name, "digest": digest, **resumes.file_record(path),
            "rel_errors": {i.info.name: i.record.rel_error for i in items if i.record}}


def write_shards(folder: Path, shards: list[list[Item]], opts: Options, progress, journal: resumes.Journal,
                 runner) -> None:
    """Every output shard through the runner; the journal learns each one as it is done."""
    names = [shard_name(n, len(shards)) for n in range(len(shards))]
    for n, record in runner.write(folder, list(zip(names, shards)), opts, progress,
                                  [journal.shards.get(name) for name in names]):
        if journal.shards.get(names[n]) != record:
            journal.add_shard(record)
        for item in shards[n]:
            if item.record:
                item.record.rel_error = record["rel_errors"][item.info.name]


class Local:
    """Runs the units of work in this process, one after another (``convert``'s default runner;
    convert/ray_runner.py has the same three methods)."""

    def session(self):
        return nullcontext()

    def measure(self, items: list[Item], candidates, progress):
        """(item, error curve, where measured) for each item."""
        return measure_items(items, candidates, progress)

    def write(self, folder: Path, shards: list[tuple[str, list[Item]]], opts: Options, progress, expected):
        """(shard number, journal record) for each shard."""
        for n, (name, items) in enumerate(shards):
            yield n, write_unit(folder, name, items, opts, progress, expected[n])


def quantization_config(opts: Options, items: list[Item], tied: dict[str, str], command: str | None = None) -> dict:
    config = {
        "quant_method": QUANT_METHOD,
        "format_version": VERSION,
        "format": "auto" if opts.auto else opts.fmt.name,
        "group_size": None if opts.auto else opts.group_size,
        "ignore": [i.info.name for i in items if i.record is None and len(i.info.shape) >= 2],
        "tied": tied,
        "exmyconv_version": __version__,
    }
    if command is not None:
        config["command"] = command
    return config


def convert(model_dir: str, out_dir: str, opts: Options | None = None, overwrite: bool = False,
            progress: bool | None = None, command: str | None = None, resume: bool = False,
            runner=None) -> Summary:
    """Quantize every eligible weight of MODEL_DIR into an exmy checkpoint at OUT_DIR. ``command``: the
    command line that asked for it, recorded in config.json (``quantization_config.command``).

    A run that fails after finishing some work keeps its temporary folder (convert/resume.py);
    ``resume`` continues such a run. ``runner``: where the units of work run (default ``Local()``;
    convert/ray_runner.py runs them on a Ray cluster, with byte-identical output)."""
    opts = opts or Options()
    runner = runner or Local()
    began = time.perf_counter()
    source = open_source(model_dir)
    journal = None
    try:
        items = plan(source, opts)
        tied = tied_duplicates(source, items)
        items = [i for i in items if i.info.name not in tied]
        manifest = resumes.manifest(source, opts, out_dir)
        journal = resumes.Journal.resume(out_dir, manifest) if resume else None
        with atomic_dir(out_dir, source.root, overwrite, reuse=journal and journal.folder) as tmp:
            if journal is None:
                journal = resumes.Journal(tmp, manifest)
            journal.folder = tmp  # atomic_dir gave a reused folder this process's name
            with journal:
                quiet = not progress if progress is not None else None
                calibrate(source, items, opts)
                search_report = None
                total = sum(i.info.nbytes for i in items if opts.auto and i.record) + sum(i.info.nbytes for i in items)
                with runner.session(), tqdm(total=total, unit="B", unit_scale=True, desc=f"{len(items)} tensors",
                                            disable=quiet, leave=False) as bar:
                    if opts.auto:
                        search_began = time.perf_counter()
                        search_report = choose_formats(items, opts, bar, journal, runner)
                        search_seconds = time.perf_counter() - search_began
                        (tmp / SEARCH_REPORT).write_text(json.dumps(search_report, indent=1) + "\n")
                    shards = assign_shards(items, opts.max_shard_size)
                    write_shards(tmp, shards, opts, bar, journal, runner)
                write_index(tmp, [[name for item in shard for name, _, _ in item.outputs] for shard in shards],
                            sum(i.out_bytes for i in items))
                config = dict(source.config or {})
                config["quantization_config"] = quantization_config(opts, items, tied, command)
                config.setdefault(GUARD_KEY, GUARD_VALUE)
                (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
                copy_side_files(source.root, tmp)
    except ExmyError as err:
        if journal is not None and journal.started:
            raise ExmyError(f"{err} ({resumes.kept_note(journal.folder)})") from None
        raise
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGHUP: say where the finished work waits
        if journal is not None and journal.started:
            raise Interrupted(getattr(err, "signum", signal.SIGINT), resumes.kept_note(journal.folder)) from None
        raise
    finally:
        source.close()
        if journal is not None:
            journal.close()
    summary = summarize(str(out_dir), opts, items, len(shards), tied)
    summary.seconds = time.perf_counter() - began
    summary.search = search_report
    summary.search_seconds = search_seconds if opts.auto else 0.0
    return summary


def summarize(out_dir: str, opts: Options, items: list[Item], shards: int, tied: dict[str, str],
              measured: bool = True) -> Summary:
    """What a run of these planned items gives: counts, bits, bytes, formats, kept tensors, and (when
    ``measured``: written) each quantized tensor's error."""
    summary = Summary(out_dir, "auto" if opts.auto else opts.fmt.name, tensors=len(items), shards=shards,
                      source_bytes=sum(i.info.nbytes for i in items),
                      output_bytes=sum(i.out_bytes for i in items), tied=tied)
    for item in items:
        r = item.record
        if r:
            summary.quantized += 1
            summary.quantized_weights += r.numel
            summary.quantized_bytes += item.out_bytes
            summary.quantized_nominal_bits += r.numel * r.nominal_bits
            if measured:
                summary.errors[item.info.name] = r.rel_error
            summary.formats[item.info.name] = r.fmt.name + ("" if r.group_size == r.k else f"-g{r.group_size}")
        elif len(item.info.shape) >= 2:
            summary.kept[item.info.name] = item.reason
    return summary


def plan_rows(items: list[Item], shards: list[list[Item]], tied: dict[str, str]) -> list[dict]:
    """Per source tensor (in source order, tied lm_heads last): what a run does with it."""
    n = len(shards)
    shard_of = {id(item): shard_name(k, n) for k, shard in enumerate(shards) for item in shard}
    rows = []
    for item in items:
        info, r = item.info, item.record
        row = {"name": info.name, "shape": list(info.shape), "dtype": info.dtype, "source_bytes": info.nbytes,
               "action": "quantize" if r else "keep", "bytes": item.out_bytes, "shard": shard_of[id(item)]}
        if r:
            row.update(format=r.fmt.name, group="channel" if r.group_size == r.k else r.group_size,
                       bits=8 * item.out_bytes / r.numel, bits_nominal=r.nominal_bits,
                       clip_search=item.clip_search)
        else:
            row["reason"] = item.reason
        rows.append(row)
    rows += [{"name": head, "action": "tied", "tied_to": emb, "bytes": 0} for head, emb in tied.items()]
    return rows


def dry_run(model_dir: str, out_dir: str, opts: Options | None = None, overwrite: bool = False,
            progress: bool | None = None) -> Summary:
    """``convert``'s planning stage alone — read the headers, plan (quantize or keep, and why), for
    ``--format auto`` the search (the same measurements and allocation as the run), shards — and
    nothing written: no OUT_DIR, no temporary folder, no sidecar. OUT_DIR is checked as the run checks
    it. The Summary has ``plan`` (:func:`plan_rows`), no measured errors (``errors`` is empty; the search
    report has each candidate's predicted error) and the planning time in ``seconds``."""
    opts = opts or Options()
    began = time.perf_counter()
    source = open_source(model_dir)
    try:
        check_out_dir(Path(out_dir), source.root, overwrite)
        items = plan(source, opts)
        tied = tied_duplicates(source, items)
        items = [i for i in items if i.info.name not in tied]
        search_report, search_seconds = None, 0.0
        if opts.auto:  # (calibration only steers the search's choices; a fixed format's plan does not need it)
            calibrate(source, items, opts)
            search_began = time.perf_counter()
            with tqdm(total=sum(i.info.nbytes for i in items if i.record), unit="B", unit_scale=True,
                      desc="searching formats", disable=not progress if progress is not None else None,
                      leave=False) as bar:
                search_report = choose_formats(items, opts, bar)
            search_seconds = time.perf_counter() - search_began
        shards = assign_shards(items, opts.max_shard_size)
    finally:
        source.close()
    summary = summarize(str(out_dir), opts, items, len(shards), tied, measured=False)
    summary.plan = plan_rows(items, shards, tied)
    summary.search, summary.search_seconds = search_report, search_seconds
    summary.seconds = time.perf_counter() - began
    return summary
