"""Conversion as a visible stream: read tensor -> plan -> quantize -> pack -> write.

Source tensors are memory-mapped one at a time and processed in row chunks, so peak memory is
about one source tensor plus a fixed working set, whatever the model size. Everything is written
into a temporary sibling of OUT_DIR that replaces it only when the whole run succeeded.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .._version import __version__

from ..format import dtypes

from . import search
from ..errors import ExmyError
from ..format.exmy import DEFAULT, get_format
from ..format.layout import (CONFIG_FILE, GUARD_KEY, GUARD_VALUE, QUANT_METHOD, SEARCH_REPORT, VERSION, TensorRecord,
                             shard_name)
from ..io.output import atomic_dir, copy_side_files, write_index
from ..format.pack import pack_codes
from ..format.quant import choose_scale_dtype, group_amax, groups_of, quantize_rows, relative_error, squared_error
from ..io.source import Source, open_source
from ..io.reader import TensorInfo
from ..io.writer import ShardWriter

CHUNK_ELEMENTS = 1 << 21  # elements of float32 work per step (~8 MB)
WORKERS = min(4, os.cpu_count() or 1)
EMBEDDINGS = re.compile(r"(embed|lm_head|(^|\.)(wte|wpe|shared)\.)")


@dataclass
class Options:
    format: str = DEFAULT
    group_size: int | None = None  # None: one scale per row
    skip: tuple[str, ...] = ()  # regexes of tensor names to keep unquantized
    quantize_embeddings: bool = False
    max_shard_size: int = 5 * 10**9
    clip_search: bool = False
    bits: float | None = None  # --format auto: average bits per quantized weight, scales included
    max_error: float | None = None  # --format auto: per-tensor relative error bound instead
    candidates: str | None = None  # --format auto: comma-separated candidate list
    tie_fused: bool = True  # --format auto: one format for the tensors engines fuse (search.FUSED_PARTNERS)
    calibration: str | None = None  # text file: activation-weighted errors
    calibration_tokens: int = 4096

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

    @property
    def outputs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        r = self.record
        if r is None:
            return [(self.info.name, self.info.dtype, self.info.shape)]
        # The scale dtype is only known after the amax pass; both are 2 bytes, and BF16 is the
        # longer name, so the header can shrink to F16 in place.
        return [(r.packed_name, "U8", r.packed_shape), (r.scale_name, "BF16", r.scale_shape)]

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

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_weights, 1)

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
        else:
            g, _ = groups_of(info.shape[-1], opts.group_size)
            item.record = TensorRecord(info.name, opts.fmt, info.shape, info.dtype, g)
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


def choose_formats(items: list[Item], opts: Options, progress) -> dict:
    """--format auto: measure every candidate on every tensor, allocate, set each record."""
    cands = search.parse_candidates(opts.candidates, opts.clip_search)
    measure, where = search.measure_backend()
    todo = [i for i in items if i.record]
    sizes = [np.array([c.nbytes(i.info.shape) for c in cands], dtype=np.float64) for i in todo]
    numels = [i.record.numel for i in todo]
    if opts.bits is not None:  # refuse an impossible budget before the long part
        search.check_budget(sizes, opts.bits * sum(numels) / 8, sum(numels))
    errs = []
    for item in todo:
        progress.set_postfix_str(item.info.name[-40:], refresh=False)
        errs.append(measure(float_chunks(item), cands, item.importance))
        progress.update(item.info.nbytes)
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
        item.record = TensorRecord(item.info.name, c.fmt, item.info.shape, item.info.dtype, g)
        item.clip_search = c.clip
        report["tensors"][item.info.name] = {
            "numel": item.record.numel, "choice": c.name,
            "options": [{"candidate": cand.name, "bits": 8 * s[j] / item.record.numel,
                         "rel_mse": float(e[j])} for j, cand in enumerate(cands)]}
    total = sum(numels)
    report["achieved_bits"] = 8 * sum(float(s[p]) for s, p in zip(sizes, picks)) / total
    report["mean_rel_mse"] = sum(float(w[p]) for w, p in zip(weighted, picks)) / total
    report["tradeoff"] = search.tradeoff(gsizes, gweighted, [sum(numels[j] for j in g) for g in groups])
    return report


def assign_shards(items: list[Item], max_bytes: int) -> list[list[Item]]:
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.out_bytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.out_bytes
    return shards


def _row_chunks(rows: np.ndarray):
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        yield rows[start:start + step]


def ordered_map(fn, items, workers: int = WORKERS):
    """fn over items on a few threads (numpy releases the GIL), results in order, bounded look-ahead."""
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


def quantize_item(item: Item, writer: ShardWriter, opts: Options, progress) -> str:
    """Stream one tensor through quantize -> pack -> write. Returns its scale dtype."""
    r = item.record
    rows = item.file.read(item.info.name).reshape(-1, r.k)
    g, ngroups = r.group_size, r.ngroups

    def scan(chunk):  # pass 1: the scales' range, and refuse NaN/Inf
        x = dtypes.to_float32(chunk, r.dtype)
        if not np.isfinite(x).all():
            raise ExmyError(f"tensor {r.name!r} contains NaN or Inf")
        return group_amax(x, g, ngroups)

    amax = np.concatenate(list(ordered_map(scan, _row_chunks(rows))))
    scale_dtype = choose_scale_dtype(amax, r.fmt)

    def encode(chunk):  # pass 2: quantize and pack
        x = dtypes.to_float32(chunk, r.dtype)
        codes, s = quantize_rows(x, r.fmt, g, scale_dtype, item.clip_search, item.importance)
        return pack_codes(codes, r.fmt), s, squared_error(x, codes, s, r.fmt, g), chunk.nbytes

    scales, sq_err, sq_ref = [], 0.0, 0.0
    for packed, s, (err, ref), nbytes in ordered_map(encode, _row_chunks(rows)):
        writer.write(r.packed_name, packed)
        scales.append(s)
        sq_err, sq_ref = sq_err + err, sq_ref + ref
        progress.update(nbytes)
    writer.write(r.scale_name, dtypes.store(np.concatenate(scales), scale_dtype))
    r.rel_error = relative_error(sq_err, sq_ref)
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
        for item in items:
            progress.set_postfix_str(item.info.name[-40:], refresh=False)
            if item.record:
                scale_dtypes[item.record.scale_name] = quantize_item(item, writer, opts, progress)
            else:
                copy_item(item, writer, progress)
        writer.close(dict(item.record.metadata() for item in items if item.record), scale_dtypes)
    except BaseException:
        writer.abort()
        raise


def quantization_config(opts: Options, items: list[Item], tied: dict[str, str]) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": VERSION,
        "format": "auto" if opts.auto else opts.fmt.name,
        "group_size": None if opts.auto else opts.group_size,
        "ignore": [i.info.name for i in items if i.record is None and len(i.info.shape) >= 2],
        "tied": tied,
        "exmyconv_version": __version__,
    }


def convert(model_dir: str, out_dir: str, opts: Options | None = None, overwrite: bool = False,
            progress: bool | None = None) -> Summary:
    """Quantize every eligible weight of MODEL_DIR into an exmy checkpoint at OUT_DIR."""
    opts = opts or Options()
    began = time.perf_counter()
    source = open_source(model_dir)
    try:
        items = plan(source, opts)
        tied = tied_duplicates(source, items)
        items = [i for i in items if i.info.name not in tied]
        with atomic_dir(out_dir, source.root, overwrite) as tmp:
            quiet = not progress if progress is not None else None
            if opts.calibration:
                from .calibration import activation_moments, match

                moments = activation_moments(source.root, opts.calibration, opts.calibration_tokens)
                matched = match(moments, [item.info.name for item in items if item.record])
                for item in items:
                    if item.record:
                        item.importance = matched[item.info.name]
            search_report = None
            if opts.auto:
                search_began = time.perf_counter()
                with tqdm(total=sum(i.info.nbytes for i in items if i.record), unit="B", unit_scale=True,
                          desc="searching formats", disable=quiet, leave=False) as bar:
                    search_report = choose_formats(items, opts, bar)
                search_seconds = time.perf_counter() - search_began
                (tmp / SEARCH_REPORT).write_text(json.dumps(search_report, indent=1) + "\n")
            shards = assign_shards(items, opts.max_shard_size)
            with tqdm(total=sum(i.info.nbytes for i in items), unit="B", unit_scale=True,
                      desc=f"{len(items)} tensors", disable=quiet, leave=False) as bar:
                for n, shard in enumerate(shards):
                    write_shard(tmp / shard_name(n, len(shards)), shard, opts, bar)
            write_index(tmp, [[name for item in shard for name, _, _ in item.outputs] for shard in shards],
                        sum(i.out_bytes for i in items))
            config = dict(source.config or {})
            config["quantization_config"] = quantization_config(opts, items, tied)
            config.setdefault(GUARD_KEY, GUARD_VALUE)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            copy_side_files(source.root, tmp)
    finally:
        source.close()
    summary = Summary(str(out_dir), "auto" if opts.auto else opts.fmt.name, tensors=len(items), shards=len(shards),
                      source_bytes=sum(i.info.nbytes for i in items),
                      output_bytes=sum(i.out_bytes for i in items))
    for item in items:
        if item.record:
            summary.quantized += 1
            summary.quantized_weights += item.record.numel
            summary.quantized_bytes += item.out_bytes
            summary.errors[item.info.name] = item.record.rel_error
            g = item.record.group_size
            summary.formats[item.info.name] = item.record.fmt.name + ("" if g == item.record.k else f"-g{g}")
        elif len(item.info.shape) >= 2:
            summary.kept[item.info.name] = item.reason
    summary.seconds = time.perf_counter() - began
    summary.search = search_report
    summary.search_seconds = search_seconds if opts.auto else 0.0
    summary.tied = tied
    return summary
