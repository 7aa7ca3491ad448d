"""Whether a checkpoint is valid: the one module that decides (formats/SPEC.md section 6).

Every rule a reader applies lives here, at each level of a checkpoint:

- JSON (``parse_json``, ``read_json``): UTF-8, nesting depth at most ``MAX_JSON_DEPTH`` (checked
  before parsing, so no input can exhaust the recursion limit), an object where one is expected;
- a folder's weight files (``weight_files``): the index ``model.safetensors.index.json`` (its
  ``weight_map`` maps tensor names to plain ``.safetensors`` file names of the folder), regular files
  only (a FIFO would block a reader), pickle checkpoints refused by name and never opened;
- one safetensors header (``safetensors_header``, which :class:`exmyconv.io.reader.SafetensorsFile`
  calls before it reads anything else): sizes, dtypes, shapes, offsets, overlaps;
- what a set of files holds together (``validate_files``): layout versions, ``exmy:T`` records and
  their packed/scale tensors, scale values, the index against the shards, ``config.json``'s
  ``quantization_config`` (``check_quantization_config``);
- a source for ``quantize`` (``validate_source``).

Every reader goes through these rules: ``quantize`` (through :func:`exmyconv.io.source.open_source`),
and for a converted checkpoint :func:`exmyconv.io.checkpoint.open_checkpoint` /
:class:`exmyconv.io.checkpoint.Checkpoint`, which ``inspect``, ``verify``, ``dequantize``,
``exmyconv.load_state_dict`` and the transformers loader use. An engine integration (the vLLM plugin
of issue 15) opens a checkpoint with ``open_checkpoint(path)`` as well, so that it accepts and refuses
exactly the files the CLI does, with the same one-line message; it never re-implements a rule.

Findings are one-line strings: fatal ones (a file that cannot be parsed at all) are raised as
:class:`~exmyconv.errors.ExmyError`, the others are collected in order (``Contents.problems``) so that
``inspect`` can list them all while every other reader raises the first.
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from ..errors import ExmyError, one_line
from ..format import dtypes
from ..format.exmy import ExMy, get_format
from ..format.layout import (INDEX_FILE, META_PREFIX, PACKED_SUFFIX, QUANT_METHOD, SCALE_SUFFIX, READ_MAJORS,
                             TensorRecord)
from ..format.quant import SCALE_EXP_RANGE, SMALLEST_NORMAL

MAX_HEADER = 100 * 1024 * 1024  # bytes of a safetensors header (the format's own limit), or of a JSON file
MAX_JSON_DEPTH = 64  # nesting of arrays and objects; real headers and configs stay below 10
MAX_BYTES = 2**63  # a tensor's shape, zero dimensions counted as 1, times its item size stays below this
FLOAT32_MAX = float(np.finfo(np.float32).max)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SHARED_SINCE = (1, 1)  # shared formats (eXmYsk) exist since layout 1.1
SCALES_ONLY = ("F8_E4M3",)  # safetensors dtypes a reader takes only as an exmy record's scales
SCALES8_SINCE = (2, 0)  # 8-bit scales (F8_E4M3 with a scale_exp) exist since layout 2.0

_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_VERSION = re.compile(r"([0-9]{1,9})\.([0-9]{1,9})")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header, checked against the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int


# --------------------------------------------------------------------------- JSON


def parse_json(data: bytes | str, where: str):
    """JSON text -> Python value, or ExmyError; arrays and objects nested at most MAX_JSON_DEPTH deep."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:  # only then can it be too deep
        marks = np.frombuffer(_STRINGS.sub(b"", raw), dtype=np.uint8)
        step = np.isin(marks, (ord("["), ord("{"))).astype(np.int64) - np.isin(marks, (ord("]"), ord("}")))
        if step.size and int(np.cumsum(step).max()) > MAX_JSON_DEPTH:
            raise ExmyError(f"{where}: not valid JSON (nested deeper than {MAX_JSON_DEPTH} levels)")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ExmyError(f"{where}: not valid JSON (not UTF-8: {err.reason} at byte {err.start})") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, or an integer of over 4300 digits
        raise ExmyError(f"{where}: not valid JSON ({err})") from None


def open_regular(path: Path):
    """A binary file object for a regular file; ExmyError for anything else (a FIFO never blocks us)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise ExmyError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ExmyError(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json(path: Path, what: str = "") -> dict:
    """A JSON file that must hold an object (config.json, the index, ...)."""
    with open_regular(path) as fh:
        try:
            raw = fh.read(MAX_HEADER + 1)
        except OSError as err:
            raise ExmyError(f"{path}: cannot read: {err.strerror or err}") from None
    if len(raw) > MAX_HEADER:
        raise ExmyError(f"{path}: larger than {MAX_HEADER} bytes")
    data = parse_json(raw, str(path))
    if not isinstance(data, dict):
        raise ExmyError(f"{path}: expected a JSON object{what}")
    return data


# --------------------------------------------------------------------------- files of a folder


def _shard_name_ok(name: str) -> bool:
    return (bool(name) and name.endswith(".safetensors") and "/" not in name and "\\" not in name
            and "\0" not in name and not name.startswith("."))


def weight_files(root: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files of a checkpoint folder and its index's weight_map (None without an index).

    With an index, exactly the files its weight_map names (each a plain ``.safetensors`` name of a
    regular file in the folder); without one, every ``*.safetensors`` file of the folder.
    """
    if not root.exists():
        raise ExmyError(f"{root}: no such directory")
    if not root.is_dir():
        raise ExmyError(f"{root}: not a directory")
    index = root / INDEX_FILE
    if index.exists() or index.is_symlink():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ExmyError(f"{index}: no weight_map (an object of tensor name -> file name)")
        for key, value in weight_map.items():
            if not isinstance(value, str):
                raise ExmyError(f"{index}: weight_map[{key!r}] is {value!r}, not a file name")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not _shard_name_ok(name):
                raise ExmyError(f"{index}: names shard {name!r}, which is not a .safetensors file of this folder")
            path = root / name
            if not path.exists():
                raise ExmyError(f"{index}: names shard {name!r}, which is missing")
            if not path.is_file():
                raise ExmyError(f"{path}: not a regular file")
        return [root / n for n in names], weight_map
    files = sorted(root.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ExmyError(f"{root}: only pickle checkpoints ({', '.join(pickles)}); exmyconv never "
                            "unpickles files: convert them to safetensors with a tool you trust")
        raise ExmyError(f"{root}: no .safetensors files")
    for path in files:
        if not path.is_file():
            raise ExmyError(f"{path}: not a regular file")
    return files, None


# --------------------------------------------------------------------------- one safetensors header


def _shape_ok(shape, itemsize: int, positive: bool = False) -> bool:
    return (isinstance(shape, list) and all(type(d) is int and d >= (1 if positive else 0) for d in shape)
            and prod(max(d, 1) for d in shape) * itemsize < MAX_BYTES)


def safetensors_header(raw: bytes, data_size: int, where: str) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """Parse and check a safetensors header (the bytes after its 8-byte length; ``data_size``: the
    bytes after the header). Returns (``__metadata__``, {name: TensorInfo}) or raises ExmyError."""
    def bad(why: str) -> ExmyError:
        return ExmyError(f"{where}: not a valid safetensors file: {why}")

    try:
        header = parse_json(raw, "header")
    except ExmyError as err:
        raise bad(str(err)) from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise bad(f"tensor {name!r} has no dtype")
        if dtype not in dtypes.STORAGE:
            raise ExmyError(f"{where}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not _shape_ok(shape, dtypes.STORAGE[dtype].itemsize):
            raise bad(f"tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise bad(f"tensor {name!r} has data offsets {offsets!r} outside the file "
                      f"({data_size} data bytes): truncated?")
        nbytes = prod(shape) * dtypes.STORAGE[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"tensor {name!r} holds {offsets[1] - offsets[0]} bytes, its shape {shape} needs {nbytes}")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], nbytes)
    spans = sorted((t.begin, t.begin + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise bad(f"tensors {first!r} and {second!r} overlap")
    return metadata, tensors


# --------------------------------------------------------------------------- versions, names, records


def parse_version(version, where: str) -> tuple[int, int]:
    """A layout version "MAJOR.MINOR" this reader reads (any minor of majors 1 and 2) -> (major, minor)."""
    match = _VERSION.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise ExmyError(f"{where}: exmy layout version {version!r} is not MAJOR.MINOR")
    major, minor = int(match[1]), int(match[2])
    if major not in READ_MAJORS:
        raise ExmyError(f"{where}: exmy layout version {version} is not supported (this reader: "
                        f"{', '.join(f'{m}.x' for m in READ_MAJORS)})")
    return major, minor


def parse_format_name(name, where: str) -> ExMy:
    """A format name exactly as the layout spells it: ``eXmY`` or ``eXmYsk`` (lowercase, one digit each)."""
    try:
        fmt = get_format(name) if isinstance(name, str) else None
    except ExmyError:
        fmt = None
    if fmt is None or fmt.name != name:
        raise ExmyError(f"{where}: {name!r} is not a format name (eXmY with 1<=X<=5, 0<=Y<=5, 1+X+Y<=8, "
                        "or eXmYsk with Y>=1 and 2<=k<=8)")
    return fmt


def _is_int(value) -> bool:
    return type(value) is int


def parse_record(key: str, text: str, version: tuple[int, int]) -> TensorRecord:
    """The ``exmy:T`` metadata entry of a file of layout ``version`` -> TensorRecord, or ExmyError."""
    name = key[len(META_PREFIX):]
    where = f"tensor {name!r}: bad exmy metadata"
    if not name:
        raise ExmyError(f"{key!r}: an exmy record without a tensor name")
    d = parse_json(text, where)
    if not isinstance(d, dict):
        raise ExmyError(f"{where} (not a JSON object)")
    for field_, kind in (("format", "a string"), ("shape", "a list"), ("dtype", "a string"),
                         ("group_size", "an integer")):
        if field_ not in d:
            raise ExmyError(f"{where} (no {field_!r})")
    fmt = parse_format_name(d["format"], where)
    if fmt.share > 1 and version < SHARED_SINCE:
        raise ExmyError(f"tensor {name!r}: shared format {fmt.name} in a layout {version[0]}.{version[1]} file "
                        "(shared formats need 1.1 or later)")
    shape = d["shape"]
    if not _shape_ok(shape, 1, positive=True) or len(shape) < 2:
        raise ExmyError(f"{where} (shape {shape!r}: a list of at least 2 positive integers)")
    if d["dtype"] not in dtypes.FLOAT:
        raise ExmyError(f"{where} (dtype {d['dtype']!r}: one of {', '.join(dtypes.FLOAT)})")
    g = d["group_size"]
    if not _is_int(g) or not 1 <= g <= shape[-1]:
        raise ExmyError(f"{where} (group_size {g!r}: an integer from 1 to K = {shape[-1]})")
    rel = d.get("rel_error", 0.0)
    if type(rel) not in (int, float) or not 0 <= rel < float("inf"):
        raise ExmyError(f"{where} (rel_error {rel!r}: a number >= 0)")
    t = d.get("scale_exp")
    if t is not None and (not _is_int(t) or not SCALE_EXP_RANGE[0] <= t <= SCALE_EXP_RANGE[1]):
        raise ExmyError(f"{where} (scale_exp {t!r}: an integer from {SCALE_EXP_RANGE[0]} to {SCALE_EXP_RANGE[1]})")
    if t is not None and version < SCALES8_SINCE:
        raise ExmyError(f"tensor {name!r}: 8-bit scales (scale_exp) in a layout {version[0]}.{version[1]} file "
                        "(they need 2.0 or later)")
    return TensorRecord(name, fmt, tuple(shape), d["dtype"], g, float(rel), layout=version[0], scale_exp=t)


def record_tensors_problem(record: TensorRecord, tensors: dict[str, TensorInfo]) -> str | None:
    """Why the stored ``T_packed`` / ``T_scale`` of a record do not fit it, or None."""
    packed, scale = tensors.get(record.packed_name), tensors.get(record.scale_name)
    if packed is None or scale is None:
        missing = record.packed_name if packed is None else record.scale_name
        return f"{record.name}: {missing} missing (it must be in the file of its exmy record)"
    if packed.dtype != "U8" or packed.shape != record.packed_shape:
        return f"{record.packed_name}: {packed.dtype}{list(packed.shape)}, expected U8{list(record.packed_shape)}"
    allowed = ("F8_E4M3",) if record.scale_exp is not None else ("F16", "BF16")
    if scale.dtype not in allowed or scale.shape != record.scale_shape:
        return f"{record.scale_name}: {scale.dtype}{list(scale.shape)}, expected {'/'.join(allowed)}" \
               f"{list(record.scale_shape)}"
    return None


SCALE_CHUNK = 1 << 20  # scale values checked at a time


def scales_ok(stored: np.ndarray, dtype: str, fmt: ExMy) -> bool:
    """Every scale finite, at least the smallest normal number of its dtype (so not zero, negative
    or subnormal) and small enough that scale x max(format) is finite in float32. 8-bit scales
    (F8_E4M3): every byte 0x01 ... 0x7E (positive and finite; their power of two keeps the products in
    range, SCALE_EXP_RANGE)."""
    flat = stored.reshape(-1)
    if dtype == "F8_E4M3":
        return bool(((flat >= 0x01) & (flat <= 0x7E)).all())
    for start in range(0, flat.size, SCALE_CHUNK):
        with np.errstate(invalid="ignore"):  # (signalling NaNs)
            s = dtypes.to_float32(flat[start:start + SCALE_CHUNK], dtype).astype(np.float64)
        # s x max is exact in float64 (8- and 7-bit significands): finite in float32 iff <= its max
        if not (np.isfinite(s).all() and (s >= SMALLEST_NORMAL[dtype]).all() and (s * fmt.max <= FLOAT32_MAX).all()):
            return False
    return True


# --------------------------------------------------------------------------- config.json


def check_quantization_config(qc: dict, where: str = "quantization_config") -> list[str]:
    """Problems of an exmy ``quantization_config`` object (SPEC section 4); [] when it is valid.

    Only ``quant_method`` is required; ``format_version`` (a version this reader reads), ``format``
    (a format name or "auto"), ``group_size`` (null or an integer >= 1), ``ignore`` (null or a list of
    names), ``tied`` (null or an object of name -> name), ``exmyconv_version`` and ``command`` (null or a
    string) must have those types when present. Unknown keys are allowed."""
    problems = []
    if "format_version" in qc:
        try:
            parse_version(qc["format_version"], f"{where}: format_version")
        except ExmyError as err:
            problems.append(str(err))
    if "format" in qc and qc["format"] != "auto":
        try:
            parse_format_name(qc["format"], f"{where}: format")
        except ExmyError as err:
            problems.append(f"{err} (or \"auto\")")
    g = qc.get("group_size")
    if g is not None and not (_is_int(g) and g >= 1):
        problems.append(f"{where}: group_size {g!r}: null (per channel) or a positive integer")
    ignore = qc.get("ignore")
    if ignore is not None and not (isinstance(ignore, list) and all(isinstance(n, str) for n in ignore)):
        problems.append(f"{where}: ignore: a list of tensor names, got {one_line(repr(ignore))[:80]}")
    tied = qc.get("tied")
    if tied is not None and not (isinstance(tied, dict) and all(isinstance(v, str) for v in tied.values())):
        problems.append(f"{where}: tied: an object of tensor name -> tensor name, got {one_line(repr(tied))[:80]}")
    for key in ("exmyconv_version", "command"):
        value = qc.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{where}: {key} {one_line(repr(value))[:80]}: a string")
    return problems


def read_config(path: Path) -> dict | None:
    """config.json of a folder (None when there is none): a JSON object whose quantization_config, if
    any, is an object, and valid (``check_quantization_config``) when its quant_method is "exmy"."""
    if not (path.exists() or path.is_symlink()):
        return None
    config = read_json(path)
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ExmyError(f"{path}: quantization_config is {type(qc).__name__}, not an object")
    if qc is not None and qc.get("quant_method") == QUANT_METHOD:
        problems = check_quantization_config(qc, f"{path}: quantization_config")
        if problems:
            raise ExmyError(problems[0])
    return config


def exmy_config(config: dict | None) -> dict | None:
    """config.json's quantization_config when it says quant_method "exmy", else None."""
    qc = (config or {}).get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def _config_problems(config: dict, records: dict, stored: set[str], where: str) -> list[str]:
    """What a (``read_config``-checked) config.json says that the files contradict."""
    qc = config.get("quantization_config")
    if qc is None:
        return []
    if qc.get("quant_method") != QUANT_METHOD:
        if records:
            return [f"{where}: quantization_config says quant_method {qc.get('quant_method')!r}, but the files "
                    f"hold exmy records (e.g. {next(iter(records))!r})"]
        return []
    problems = []
    both = sorted(set(qc.get("ignore") or []) & set(records))
    if both:
        problems.append(f"{both[0]!r} is both quantized and in quantization_config.ignore")
    for head, emb in sorted((qc.get("tied") or {}).items()):
        if head in stored or head in records:
            problems.append(f"quantization_config.tied: {head!r} is stored, but a tied tensor is not")
        elif emb not in stored and emb not in records:
            problems.append(f"quantization_config.tied: {head!r} is tied to {emb!r}, which is not stored")
    return problems


# --------------------------------------------------------------------------- what the files hold


@dataclass
class Contents:
    """What a set of files holds: quantized tensors by source name (record, file), everything else
    by stored name (info, file), and the problems found, in a fixed order."""

    records: dict = field(default_factory=dict)
    plain: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    bad_scales: set[str] = field(default_factory=set)  # records whose scales are invalid

    def problem(self, text: str) -> None:
        self.problems.append(one_line(text))


def _scan_file(f, contents: Contents, held: dict) -> None:
    """Records, packed/scale tensors and plain tensors of one opened file (``f.path``, ``.metadata``,
    ``.tensors``); ``held``: stored name -> file name, across files."""
    name_ = f.path.name
    keys = [k for k in f.metadata if k.startswith(META_PREFIX)]
    for name in f.tensors:
        if name in held:
            contents.problem(f"tensor {name!r} is in both {held[name]} and {name_}")
        else:
            held[name] = name_
    version = None
    if "exmy_version" in f.metadata:
        try:
            version = parse_version(f.metadata["exmy_version"], name_)
        except ExmyError as err:
            contents.problem(str(err))
            return
    elif keys:
        contents.problem(f"{name_}: has exmy records but no exmy_version in its metadata")
        return
    claimed = set()
    for key in keys:
        try:
            record = parse_record(key, f.metadata[key], version)
        except ExmyError as err:
            contents.problem(f"{name_}: {err}")
            continue
        claimed |= {record.packed_name, record.scale_name}
        why = record_tensors_problem(record, f.tensors)
        if why:
            contents.problem(f"{name_}: {why}")
        elif record.name in f.tensors:
            contents.problem(f"{name_}: {record.name!r} is stored both quantized and unquantized")
        elif record.name in contents.records:
            contents.problem(f"{name_}: {record.name!r} has exmy records in two files")
        else:
            contents.records[record.name] = (record, f)
    for name, info in f.tensors.items():
        if name in claimed:
            continue
        if keys and name.endswith((PACKED_SUFFIX, SCALE_SUFFIX)):
            contents.problem(f"{name_}: {name} has no exmy metadata")
        if info.dtype in SCALES_ONLY:  # (an fp8 model is not a source this converter reads)
            contents.problem(f"{name_}: tensor {name!r} has unsupported dtype {info.dtype!r} (it only holds the "
                             "8-bit scales of an exmy record)")
        contents.plain.setdefault(name, (info, f))


def _index_problems(weight_map: dict, held: dict) -> list[str]:
    problems = []
    for name, file in weight_map.items():
        if held.get(name) != file:
            where = f" (it is in {held[name]})" if name in held else ", nor does any other shard it names"
            problems.append(f"{INDEX_FILE}: names {file} for tensor {name!r}, which that file does not hold{where}")
    for name, file in held.items():
        if name not in weight_map:
            problems.append(f"{file}: holds {name!r}, which {INDEX_FILE} does not list")
    return problems


def validate_files(files: list, config: dict | None = None, weight_map: dict | None = None,
                   where: str = "config.json") -> Contents:
    """Everything a set of opened safetensors files holds, checked: per file the layout version, its
    ``exmy:T`` records and their ``T_packed`` / ``T_scale`` tensors and no orphans; across files no
    tensor twice and the index (``weight_map``, None without one) naming exactly the stored tensors
    in their files; ``config`` (config.json, None without one) and its quantization_config; and
    every scale value. ``files``: objects with ``.path``, ``.metadata``, ``.tensors`` and ``.read``
    (:class:`exmyconv.io.reader.SafetensorsFile`)."""
    contents = Contents()
    held: dict[str, str] = {}
    for f in files:
        _scan_file(f, contents, held)
    if weight_map is not None:
        for text in _index_problems(weight_map, held):
            contents.problem(text)
    if config is not None:
        for text in _config_problems(config, contents.records, set(contents.plain), where):
            contents.problem(text)
    for name, (record, f) in contents.records.items():
        dtype = f.tensors[record.scale_name].dtype
        if not scales_ok(f.read(record.scale_name), dtype, record.fmt):
            contents.bad_scales.add(name)
            contents.problem(f"{name}: scales contain zero, negative, subnormal, infinite or NaN values, "
                             f"or values whose product with the format's max overflows float32")
    return contents


def validate_source(files: list, config: dict | None, weight_map: dict | None, root: Path) -> None:
    """A checkpoint to quantize: valid, and not already an exmy checkpoint; ExmyError otherwise."""
    if exmy_config(config) is not None or any(k.startswith(META_PREFIX) for f in files for k in f.metadata):
        raise ExmyError(f"{root}: already an exmy checkpoint")
    problems = validate_files(files, config, weight_map).problems
    if problems:
        raise ExmyError(f"{root}: {problems[0]}")
