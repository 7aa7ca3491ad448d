"""Structure-aware fuzzing of the checkpoint readers (issue 17).

Real conversions (``make_bases``) are damaged one way at a time (``mutate``): header JSON fields
(dtype, shape, data_offsets, entries, ``__metadata__``), ``exmy:T`` records (every field, types,
nesting, removal), truncation and appended bytes, the index (wrong shard, ghost or missing keys,
non-string values, broken JSON), config.json's quantization_config, scale bytes (random and special
values) and payload bytes. Each case then goes through every reader (``readers.run_readers``) under a
time limit (``CASE_SECONDS``, SIGALRM) and a memory limit (growth of the process's peak RSS), and
``readers.agree`` requires: no traceback or internal error, no hang, one-line messages, and the same
verdict (accept, or refuse for the same reason) from every reader.

``tests/test_fuzz_reader.py`` runs a few hundred cases with a fixed seed in CI; ``scripts/fuzz-reader N``
runs N with any seed. A failing case prints its seed and index: ``scripts/fuzz-reader --seed S --only I``
reproduces it.
"""
from __future__ import annotations

import contextlib
import json
import random
import resource
import shutil
import signal
import struct
import warnings
from pathlib import Path

import numpy as np

from conftest import make_checkpoint
from readers import agree, run_readers

CASE_SECONDS = 20  # per case, all readers together
CASE_MEMORY = 512 * 2**20  # bytes the process's peak RSS may grow by in one case

BASES = {  # name -> (quantize options, single file?)
    "e2m2-sharded": (dict(format="e2m2", max_shard_size=3000), False),
    "e2m2s4-g32": (dict(format="e2m2s4", group_size=32), False),
    "e3m1-g48-file": (dict(format="e3m1", group_size=48), True),
}


def make_bases(root: Path) -> dict[str, Path]:
    """Small real conversions: fp32 / fp16 / bf16 sources, 2-D and 3-D, a kept 1-D and an integer tensor."""
    import ml_dtypes

    import exmyconv

    rng = np.random.default_rng(17)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((12, 96)).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": (rng.standard_normal((8, 150)) * 1e-3).astype(np.float16),
        "model.layers.0.experts.weight": rng.standard_normal((2, 4, 64)).astype(ml_dtypes.bfloat16),
        "model.layers.0.norm.weight": np.ones(96, np.float32),
        "model.position_ids": np.arange(16, dtype=np.int64).reshape(1, 16),
    }
    src = make_checkpoint(root / "src", tensors, config={"model_type": "llama", "tie_word_embeddings": False})
    out = {}
    for name, (opts, single) in BASES.items():
        exmyconv.quantize(str(src), str(root / name), progress=False, **opts)
        if single:
            folder = root / f"{name}-alone"
            folder.mkdir()
            shutil.move(str(root / name / "model.safetensors"), folder / "model.safetensors")
            out[name] = folder / "model.safetensors"
        else:
            out[name] = root / name
    return out


# --------------------------------------------------------------------------- raw safetensors


def read_raw(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_raw(path: Path, header, data: bytes, text: str | None = None) -> None:
    raw = (text if text is not None else json.dumps(header, separators=(",", ":"))).encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# --------------------------------------------------------------------------- values

def odd_value(rnd: random.Random):
    """A JSON value of a random, often wrong, kind."""
    return rnd.choice([
        0, -1, 1, 2**31, 2**63, 2**70, -2**70, 1.5, 1e999, -1e999, float("nan"), True, False, None, "", "x",
        "e2m2", "E2M2", "1.1", "2.0", [], [1], [0, 5], [2**40, 2**40], [-1, 3], ["a"], [[1]], {}, {"a": 1},
        "[" * 200 + "]" * 200, "\n", "\u2028evil", rnd.randint(-300, 300), rnd.random() * 1000,
        [rnd.randint(0, 300) for _ in range(rnd.randint(0, 4))]])


def deep_json(rnd: random.Random) -> str:
    n = rnd.choice([70, 1000, 100_000])
    return "[" * n + "]" * n


# --------------------------------------------------------------------------- mutations
# Each takes (rnd, folder, files) and returns a description; ``files``: the case's safetensors files.


def m_header_field(rnd, folder, files):
    path = rnd.choice(files)
    header, data = read_raw(path)
    name = rnd.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    field = rnd.choice(["dtype", "shape", "data_offsets", "entry", "extra", "delete"])
    if field == "dtype":
        entry["dtype"] = rnd.choice(["F32", "F16", "BF16", "U8", "I8", "I64", "F64", "BOOL", "F8_E4M3", "u8",
                                     odd_value(rnd)])
    elif field == "shape":
        shape = list(entry["shape"])
        how = rnd.choice(["dim", "add", "drop", "swap", "odd"])
        if how == "dim" and shape:
            shape[rnd.randrange(len(shape))] = odd_value(rnd)
        elif how == "add":
            shape.insert(rnd.randrange(len(shape) + 1), rnd.choice([0, 1, 2, 2**62]))
        elif how == "drop" and shape:
            shape.pop(rnd.randrange(len(shape)))
        elif how == "swap":
            shape = shape[::-1]
        else:
            shape = odd_value(rnd)
        entry["shape"] = shape
    elif field == "data_offsets":
        b, e = entry["data_offsets"]
        entry["data_offsets"] = rnd.choice([[b + 1, e + 1], [b, e - 1], [e, b], [b, e + 10**9], [0, e - b],
                                            [b, 2**64], [-8, e], [b], [b, e, e], odd_value(rnd)])
    elif field == "entry":
        header[name] = odd_value(rnd)
    elif field == "extra":
        entry[rnd.choice(["x", "dtype2", ""])] = odd_value(rnd)
    else:
        entry.pop(rnd.choice(["dtype", "shape", "data_offsets"]))
    write_raw(path, header, data)
    return f"{path.name}: header {name!r} {field}"


def m_metadata(rnd, folder, files):
    path = rnd.choice(files)
    header, data = read_raw(path)
    meta = header.setdefault("__metadata__", {})
    how = rnd.choice(["version", "drop version", "non-string", "extra", "not object", "deep", "format"])
    if how == "version":
        meta["exmy_version"] = rnd.choice(["1.0", "1.1", "1.2", "1.9", "2.0", "0.1", "1", "1.1.1", "", " 1.1",
                                           "01.1", "1.x", "9" * 40 + ".1"])
    elif how == "drop version":
        meta.pop("exmy_version", None)
    elif how == "non-string":
        meta[rnd.choice(list(meta) or ["x"])] = odd_value(rnd)
    elif how == "extra":
        meta[rnd.choice(["x", "exmy:", "exmy:ghost", "exmy:model.norm.weight"])] = rnd.choice(
            ["{}", "1", '{"format": "e2m2"}', "x"])
    elif how == "not object":
        header["__metadata__"] = odd_value(rnd)
    elif how == "deep":
        header["__metadata__"] = {"x": "y"}
        write_raw(path, None, data, text=json.dumps(header)[:-1] + ',"z":' + deep_json(rnd) + "}")
        return f"{path.name}: deep JSON in the header"
    else:
        meta["format"] = odd_value(rnd)
    write_raw(path, header, data)
    return f"{path.name}: __metadata__ {how}"


def m_record(rnd, folder, files):
    candidates = [p for p in files if any(k.startswith("exmy:") for k in read_raw(p)[0].get("__metadata__", {}))]
    if not candidates:
        return m_header_field(rnd, folder, files)
    path = rnd.choice(candidates)
    header, data = read_raw(path)
    meta = header["__metadata__"]
    key = rnd.choice([k for k in meta if k.startswith("exmy:")])
    record = json.loads(meta[key])
    how = rnd.choice(["field", "field", "drop", "text", "rename", "delete", "deep", "swap format", "extra"])
    if how == "field":
        field = rnd.choice(["format", "shape", "dtype", "group_size", "rel_error"])
        record[field] = odd_value(rnd)
        meta[key] = json.dumps(record)
        how = f"{field} = {record[field]!r}"[:80]
    elif how == "drop":
        record.pop(rnd.choice(list(record)))
        meta[key] = json.dumps(record)
    elif how == "text":
        meta[key] = rnd.choice(["", "{", "[1,2]", "null", "5", '"x"', meta[key][:-1], meta[key] + "x"])
    elif how == "rename":
        meta["exmy:" + rnd.choice(["ghost", "", key[5:] + "_packed", "model.position_ids"])] = meta.pop(key)
    elif how == "delete":
        meta.pop(key)
    elif how == "deep":
        meta[key] = deep_json(rnd)
    elif how == "swap format":  # same code width: valid, decodes to other values
        record["format"] = {"e2m2": "e3m1", "e3m1": "e2m2", "e2m2s4": "e3m1s4"}.get(record["format"], "e2m2")
        meta[key] = json.dumps(record)
    else:
        record[rnd.choice(["x", "note"])] = odd_value(rnd)
        meta[key] = json.dumps(record)
    write_raw(path, header, data)
    return f"{path.name}: record {key!r} {how}"


def m_truncate(rnd, folder, files):
    path = rnd.choice(files)
    blob = path.read_bytes()
    how = rnd.choice(["cut", "cut header", "append", "length"])
    if how == "cut":
        path.write_bytes(blob[:rnd.randrange(len(blob))])
    elif how == "cut header":
        (n,) = struct.unpack("<Q", blob[:8])
        path.write_bytes(blob[:rnd.randrange(min(len(blob), 8 + n + 1))])
    elif how == "append":
        path.write_bytes(blob + bytes(rnd.randrange(1, 300)))
    else:
        path.write_bytes(struct.pack("<Q", rnd.choice([0, 1, 7, 2**63, 2**64 - 1, len(blob)])) + blob[8:])
    return f"{path.name}: {how}"


def m_header_bytes(rnd, folder, files):
    path = rnd.choice(files)
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    for _ in range(rnd.randint(1, 4)):
        i = 8 + rnd.randrange(n)
        blob[i] = rnd.choice([ord(c) for c in '{}[]",:0 9ae\\'] + [0, 0xFF, rnd.randrange(256)])
    path.write_bytes(bytes(blob))
    return f"{path.name}: header bytes"


def _tensor_bytes(path: Path, name: str) -> tuple[dict, bytes, int, int]:
    header, data = read_raw(path)
    b, e = header[name]["data_offsets"]
    return header, data, b, e


def m_scales(rnd, folder, files):
    pairs = [(p, n) for p in files for n in read_raw(p)[0] if n.endswith("_scale")]
    path, name = rnd.choice(pairs)
    header, data, b, e = _tensor_bytes(path, name)
    values = np.frombuffer(data[b:e], dtype="<u2").copy()
    bf16 = header[name]["dtype"] == "BF16"
    specials = ([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x0001, 0xBF80, 0x7F7F] if bf16 else
                [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x0001, 0x03FF, 0xBC00, 0x7BFF])
    for _ in range(rnd.randint(1, 3)):
        values[rnd.randrange(values.size)] = rnd.choice(specials + [rnd.randrange(65536)] * 3)
    if rnd.random() < 0.2:  # reinterpret: F16 <-> BF16 (same size)
        header[name]["dtype"] = "F16" if bf16 else "BF16"
    write_raw(path, header, data[:b] + values.tobytes() + data[e:])
    return f"{path.name}: scale bytes of {name}"


def m_payload(rnd, folder, files):
    pairs = [(p, n) for p in files for n in read_raw(p)[0] if n != "__metadata__"]
    path, name = rnd.choice(pairs)
    header, data, b, e = _tensor_bytes(path, name)
    if e == b:
        return m_scales(rnd, folder, files)
    blob = bytearray(data)
    for _ in range(rnd.randint(1, 8)):
        blob[rnd.randrange(b, e)] = rnd.randrange(256)
    write_raw(path, header, bytes(blob))
    return f"{path.name}: payload bytes of {name}"


def m_index(rnd, folder, files):
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return m_config(rnd, folder, files)
    data = json.loads(index.read_text())
    wm = data["weight_map"]
    how = rnd.choice(["move", "ghost", "drop", "value", "not object", "text", "deep", "path"])
    key = rnd.choice(list(wm))
    if how == "move":
        wm[key] = rnd.choice(sorted(set(wm.values()) - {wm[key]}) or ["other.safetensors"])
    elif how == "ghost":
        wm["ghost.weight"] = rnd.choice(sorted(set(wm.values())))
    elif how == "drop":
        wm.pop(key)
    elif how == "value":
        wm[key] = odd_value(rnd)
    elif how == "not object":
        data["weight_map"] = odd_value(rnd)
    elif how == "path":
        wm[key] = rnd.choice(["../x.safetensors", "/etc/passwd", "sub/a.safetensors", "config.json", ".x.safetensors"])
    if how == "text":
        index.write_text(rnd.choice(["", "{", "[]", "null", json.dumps(data)[:-5]]))
    elif how == "deep":
        index.write_text('{"weight_map": ' + deep_json(rnd) + "}")
    else:
        index.write_text(json.dumps(data))
    return f"index {how} {key!r}"


def m_config(rnd, folder, files):
    config_file = folder / "config.json"
    if not config_file.exists():
        return m_record(rnd, folder, files)
    config = json.loads(config_file.read_text())
    qc = config["quantization_config"]
    how = rnd.choice(["field", "field", "drop", "not object", "method", "ignore", "tied", "deep"])
    if how == "field":
        field = rnd.choice(["format", "group_size", "ignore", "tied", "format_version", "exmyconv_version"])
        qc[field] = odd_value(rnd)
        how = f"{field} = {qc[field]!r}"[:80]
    elif how == "drop":
        qc.pop(rnd.choice(list(qc)))
    elif how == "not object":
        config["quantization_config"] = odd_value(rnd)
    elif how == "method":
        qc["quant_method"] = rnd.choice(["gptq", "EXMY", None, 5])
    elif how == "ignore":
        qc["ignore"] = [rnd.choice(["model.layers.0.mlp.up_proj.weight", "model.position_ids", "x"])]
    elif how == "tied":
        qc["tied"] = {rnd.choice(["lm_head.weight", "model.layers.0.norm.weight"]):
                      rnd.choice(["model.layers.0.mlp.up_proj.weight", "ghost"])}
    if how == "deep":
        config_file.write_text('{"quantization_config": ' + deep_json(rnd) + "}")
    else:
        config_file.write_text(json.dumps(config))
    return f"config.json {how}"


def m_files(rnd, folder, files):
    if not (folder / "config.json").exists():  # a single file: its folder is not the checkpoint
        return m_truncate(rnd, folder, files)
    how = rnd.choice(["delete", "rename", "extra", "drop index", "index only"])
    path = rnd.choice(files)
    if how == "delete":
        path.unlink()
    elif how == "rename":
        path.rename(folder / "renamed.safetensors")
    elif how == "extra":
        shutil.copyfile(path, folder / "extra.safetensors")
    elif how == "drop index":
        (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    else:  # an index over a single file, naming what it holds
        header, _ = read_raw(path)
        wm = {name: path.name for name in header if name != "__metadata__"}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return f"files: {how} {path.name}"


MUTATIONS = [m_header_field, m_metadata, m_record, m_record, m_truncate, m_header_bytes, m_scales, m_scales,
             m_payload, m_index, m_config, m_files]


def make_case(seed: int, i: int, bases: dict[str, Path], work: Path) -> tuple[Path, str]:
    """Case ``i`` of ``seed``: a damaged copy of one base under ``work`` and what was done to it."""
    rnd = random.Random(f"{seed}:{i}")
    name = rnd.choice(sorted(bases))
    base = bases[name]
    folder = work / f"case{i}"
    shutil.copytree(base if base.is_dir() else base.parent, folder)
    target = folder if base.is_dir() else folder / base.name
    files = sorted(folder.glob("*.safetensors"))
    steps = []
    for _ in range(1 if rnd.random() < 0.8 else 2):
        try:
            steps.append(rnd.choice(MUTATIONS)(rnd, folder, files))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, struct.error, RecursionError,
                OSError):
            steps.append("(a second change did not apply to the damaged file)")
    return target, f"{name}: " + "; ".join(steps)


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise CaseTimeout(f"no verdict after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def run_case(target: Path, what: str) -> str:
    """Every reader on one case, within the limits; returns 'accepted' or the refusal's message."""
    before = peak_rss()
    with time_limit(CASE_SECONDS), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's, printed by a fresh CLI process: not one line
        verdicts = run_readers(target)
    grown = peak_rss() - before
    assert grown < CASE_MEMORY, f"{what}: peak RSS grew by {grown / 2**20:.0f} MB"
    verdict = agree(verdicts, what)
    return "accepted" if verdict.ok else verdict.message


def fuzz(count: int, seed: int, work: Path, only: int | None = None, log=None) -> dict:
    """Run ``count`` cases (or just case ``only``); returns counts. Raises AssertionError on the first
    case where the readers misbehave, naming its seed and index."""
    bases = make_bases(work / "bases")
    stats = {"cases": 0, "accepted": 0, "refused": 0}
    for i in range(count) if only is None else [only]:
        target, what = make_case(seed, i, bases, work / "cases")
        try:
            result = run_case(target, what)
        except (AssertionError, CaseTimeout) as err:
            raise AssertionError(f"fuzz case --seed {seed} --only {i} ({what}): {err}") from None
        stats["cases"] += 1
        stats["accepted" if result == "accepted" else "refused"] += 1
        if log:
            log(f"{i}: {what} -> {result[:160]}")
        shutil.rmtree(target if target.is_dir() else target.parent)
    return stats
