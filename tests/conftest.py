"""Shared fixtures and *independent* helpers for the exmyconv test suite.

Everything that serves as an oracle here is written from formats/SPEC.md alone and shares no
code with exmyconv: a raw safetensors writer/reader, the ExMy value formula (exact, with
Fractions), a brute-force nearest-value encoder and a bit-by-bit payload decoder/encoder.
"""
from __future__ import annotations

import contextlib
import io

import json
import os
import shlex
import signal
import struct
from fractions import Fraction
from math import prod
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from exmyconv import cli

# --------------------------------------------------------------------------- interrupted runs


def signals_at_default() -> None:
    """preexec_fn of a CLI run that a test interrupts: SIGHUP, SIGINT and SIGTERM at their defaults in
    the child, whatever started pytest (nohup ignores SIGHUP, a non-interactive shell's background job
    ignores SIGINT), since the CLI rightly keeps a signal that its parent ignores (io/output.py)."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


# --------------------------------------------------------------------------- random seeds


def _fresh_seed() -> int:
    env = os.environ.get("EXMY_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(8), "little")


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (EXMY_TEST_SEED=... reproduces one); shown when the test fails."""
    value = _fresh_seed()
    print(f"\n[seed] {request.node.nodeid}: EXMY_TEST_SEED={value}")
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("random seed", f"EXMY_TEST_SEED={value}"))


# --------------------------------------------------------------------------- ExMy oracles

def spec_value(e: int, m: int, code: int) -> Fraction:
    """SPEC section 1, literally: the exact value of an ExMy code."""
    bias = 2 ** (e - 1) - 1
    emin = 1 - bias
    s = code >> (e + m)
    f = (code >> m) & ((1 << e) - 1)
    mant = code & ((1 << m) - 1)
    if f == 0:
        mag = Fraction(mant) * Fraction(2) ** (emin - m)
    else:
        mag = Fraction((1 << m) + mant) * Fraction(2) ** (f - bias - m)
    return -mag if s else mag


def spec_table(e: int, m: int) -> np.ndarray:
    """float64 values of all codes (exact; -0 for the negative zero code)."""
    out = []
    for code in range(1 << (1 + e + m)):
        v = float(spec_value(e, m, code))
        if v == 0 and code >> (e + m):
            v = -0.0
        out.append(v)
    return np.array(out, dtype=np.float64)


def brute_force_encode(y, e: int, m: int) -> np.ndarray:
    """Nearest code by exhaustive search (SPEC rounding): clamp, argmin |.|, ties -> even code.

    Works in float64 on float32 inputs.
    """
    y = np.asarray(y, dtype=np.float32).astype(np.float64)
    mags = spec_table(e, m)[: 1 << (e + m)]  # increasing, code = index
    # SPEC: clamp |y| to max first. After clamping, the distances to the two neighbours that
    # matter are exact in float64 (Sterbenz), so ties are found exactly.
    a = np.minimum(np.abs(y), mags[-1]).reshape(-1, 1)
    dist = np.abs(a - mags[None, :])
    best = dist.min(axis=1, keepdims=True)
    tied = dist == best
    # among the tied candidates prefer an even code, else the (single) one
    even = tied & (np.arange(mags.size) % 2 == 0)[None, :]
    pick = np.where(even.any(axis=1), even.argmax(axis=1), tied.argmax(axis=1))
    sign = np.signbit(y.reshape(-1)).astype(np.int64) << (e + m)
    return (pick | sign).astype(np.uint8).reshape(y.shape)


# --------------------------------------------------------------------------- payload oracles

def spec_planes(bits: int) -> list[int]:
    return [w for w in (8, 4, 2, 1) if bits & w]


def spec_pack(codes: np.ndarray, bits: int, align: int = 32) -> np.ndarray:
    """SPEC section 3 written as plainly as possible (bit by bit); ``align`` 128 for layout 1.x."""
    codes = np.asarray(codes, dtype=np.uint8)
    *lead, k = codes.shape
    kp = align * (-(-k // align))
    rows = codes.reshape(-1, k).astype(np.int64)
    out = np.zeros((rows.shape[0], kp * bits // 8), dtype=np.uint8)
    padded = np.zeros((rows.shape[0], kp), dtype=np.int64)
    padded[:, :k] = rows
    offset, remaining = 0, bits
    for w in spec_planes(bits):
        remaining -= w
        field = (padded >> remaining) & ((1 << w) - 1)
        for bit in range(w):
            pos = np.arange(kp) * w + bit  # bit position inside the plane
            b = (field >> bit) & 1
            np.add.at(out, (slice(None), offset + pos // 8), (b << (pos % 8)).astype(np.uint8))
        offset += kp * w // 8
    return out.reshape(*lead, kp * bits // 8)


def spec_unpack(payload: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Decode codes from a payload following SPEC section 3's decoding paragraph."""
    payload = np.asarray(payload, dtype=np.uint8)
    *lead, nbytes = payload.shape
    kp = 32 * (-(-k // 32))
    assert nbytes == kp * bits // 8, (nbytes, kp, bits)
    rows = payload.reshape(-1, nbytes).astype(np.int64)
    codes = np.zeros((rows.shape[0], kp), dtype=np.int64)
    offset = 0
    for w in spec_planes(bits):
        field = np.zeros_like(codes)
        for bit in range(w):
            pos = np.arange(kp) * w + bit
            field |= ((rows[:, offset + pos // 8] >> (pos % 8)) & 1) << bit
        codes = (codes << w) | field
        offset += kp * w // 8
    return codes.astype(np.uint8).reshape(*lead, kp)


# --------------------------------------------------------------------------- safetensors (raw)

NP_TO_ST = {
    np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype("int64"): "I64", np.dtype("int32"): "I32",
    np.dtype("int16"): "I16", np.dtype("int8"): "I8", np.dtype("uint8"): "U8",
    np.dtype("uint16"): "U16", np.dtype("uint32"): "U32", np.dtype("uint64"): "U64", np.dtype("bool"): "BOOL",
}
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1}
ST_TO_NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16, "I64": "<i8",
            "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4",
            "U64": "<u8", "BOOL": "?"}


class Raw:
    """A tensor given as (dtype name, shape, raw bytes) - lets tests write anything at all."""

    def __init__(self, dtype: str, shape, data: bytes):
        self.dtype, self.shape, self.data = dtype, list(shape), bytes(data)


def write_safetensors(path, tensors: dict, metadata: dict | None = None, header_override=None) -> Path:
    """Write a safetensors file without exmyconv. ``tensors``: name -> np.ndarray or Raw.

    ``header_override(header_dict)`` may edit the header before it is written (for lies).
    """
    path = Path(path)
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    blobs, offset = [], 0
    for name, t in tensors.items():
        if isinstance(t, Raw):
            dtype, shape, data = t.dtype, t.shape, t.data
        else:
            arr = np.array(t, copy=None, order="C")  # (ascontiguousarray would make scalars 1-D)
            dtype, shape, data = NP_TO_ST[arr.dtype], list(arr.shape), arr.tobytes()  # little-endian host
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if header_override is not None:
        header = header_override(header) or header
    raw = json.dumps(header).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def read_safetensors(path):
    """Independent reader: (metadata, {name: (dtype, shape, raw bytes)}, header_len)."""
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    metadata = header.pop("__metadata__", {})
    data = blob[8 + n:]
    out = {}
    covered = 0
    for name, entry in header.items():
        b, e = entry["data_offsets"]
        assert e - b == prod(entry["shape"]) * ST_ITEMSIZE[entry["dtype"]], name
        out[name] = (entry["dtype"], tuple(entry["shape"]), data[b:e])
        covered += e - b
    assert covered == len(data), f"{path}: {len(data) - covered} data bytes belong to no tensor"
    return metadata, out, n


def as_array(dtype: str, shape, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=ST_TO_NP[dtype]).reshape(shape)


def to_f32(arr: np.ndarray) -> np.ndarray:
    """Any float array (incl. ml_dtypes.bfloat16) -> float32, exactly."""
    return np.asarray(arr).astype(np.float32)


def make_checkpoint(root, tensors: dict, config: dict | None = None, shards: list[list[str]] | None = None,
                    extra_files: dict | None = None) -> Path:
    """A Hugging Face style checkpoint dir. ``shards``: tensor-name lists, one per shard file."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(json.dumps(config, indent=2))
    if shards is None:
        write_safetensors(root / "model.safetensors", tensors, {"format": "pt"})
    else:
        n = len(shards)
        weight_map, total = {}, 0
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            write_safetensors(root / fname, {k: tensors[k] for k in names}, {"format": "pt"})
            for k in names:
                weight_map[k] = fname
                total += np.asarray(tensors[k]).nbytes
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for rel, content in (extra_files or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


# --------------------------------------------------------------------------- CLI

@pytest.fixture
def run_cli(capsys):
    """exmyconv.cli.main.main(args) -> (exit code, stdout, stderr)."""
    def run(*args):
        capsys.readouterr()
        try:
            cli.main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err
    return run


def tree_snapshot(root: Path) -> dict:
    """Relative path -> bytes (or None for directories) of everything under root."""
    root = Path(root)
    snap = {}
    for p in sorted(root.rglob("*")):
        snap[str(p.relative_to(root))] = p.read_bytes() if p.is_file() else None
    return snap


def output_snapshot(root: Path, command: bool = True) -> dict:
    """tree_snapshot of a converted folder with its own path in the recorded quantize command
    (config.json, quantization_config.command) replaced by OUT_DIR: two runs of one command into two
    folders compare equal, and any other difference in the command still shows. ``command=False``
    leaves the command out (to compare a Python-API conversion, which records none, with the CLI's)."""
    snap = tree_snapshot(root)
    raw = snap.get("config.json")
    if raw is not None:
        config = json.loads(raw)
        qc = config.get("quantization_config") or {}
        if not command:
            qc.pop("command", None)
        if "command" in qc:
            qc["command"] = " ".join("OUT_DIR" if w == str(root) else w for w in shlex.split(qc["command"]))
        snap["config.json"] = json.dumps(config, indent=2).encode()
    return snap


@pytest.fixture
def small_source(tmp_path, rng):
    """A small mixed checkpoint: fp32/fp16/bf16, 2-D and 3-D, K not multiples of 128, kept tensors."""
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((50, 64)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": (rng.standard_normal((24, 200)) * 0.05).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": (rng.standard_normal((40, 130)) * 0.02).astype(np.float16),
        "model.layers.0.self_attn.q_proj.weight": (rng.standard_normal((16, 96)) * 0.1).astype(ml_dtypes.bfloat16),
        "model.layers.0.experts.weight": (rng.standard_normal((3, 8, 150)) * 0.03).astype(np.float32),
        "model.layers.0.input_layernorm.weight": (1 + 0.1 * rng.standard_normal(64)).astype(np.float32),
        "model.layers.0.mlp.up_proj.bias": rng.standard_normal(24).astype(np.float16),
        "model.position_ids": np.arange(32, dtype=np.int64).reshape(1, 32),
        "lm_head.weight": rng.standard_normal((50, 64)).astype(np.float32),
    }
    config = {"model_type": "llama", "hidden_size": 64, "architectures": ["LlamaForCausalLM"]}
    extra = {"tokenizer.json": '{"version": "1.0"}', "generation_config.json": '{"do_sample": false}',
             "sub/notes.txt": "side file in a subfolder\n", "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}'}
    root = make_checkpoint(tmp_path / "src", tensors, config=config, extra_files=extra)
    return root, tensors, config


def cli_call(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of cli.main(args), usable outside a test function (no capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def moe_checkpoint(root, rng, layers: int = 4, hidden: int = 128, ffn: int = 256, experts: int = 4,
                   source_shards: int = 3, dtype=np.float32) -> Path:
    """A sharded Llama/Mixtral-like checkpoint of random weights: q/k/v/o, gate/up/down, every other
    layer an MoE layer with ``experts`` experts, norms, embeddings; names sorted as HF writes them."""
    tensors = {"model.embed_tokens.weight": rng.standard_normal((64, hidden)), "model.norm.weight": np.ones(hidden),
               "lm_head.weight": rng.standard_normal((64, hidden))}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            tensors[p + f"self_attn.{name}_proj.weight"] = rng.standard_normal((hidden, hidden)) * 0.05
        tensors[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(hidden)
        mlps = [p + "mlp."] if i % 2 == 0 else [p + f"mlp.experts.{e}." for e in range(experts)]
        for m in mlps:
            tensors[m + "gate_proj.weight"] = rng.standard_normal((ffn, hidden)) * 0.03
            tensors[m + "up_proj.weight"] = rng.standard_normal((ffn, hidden)) * 0.03
            tensors[m + "down_proj.weight"] = rng.standard_normal((hidden, ffn)) * 0.02
        if i % 2:
            tensors[p + "mlp.gate.weight"] = rng.standard_normal((experts, hidden)) * 0.1
    tensors = {k: np.asarray(tensors[k]).astype(dtype) for k in sorted(tensors)}
    names = list(tensors)
    per = -(-len(names) // source_shards)
    return make_checkpoint(root, tensors, config={"model_type": "mixtral", "hidden_size": hidden},
                           shards=[names[i:i + per] for i in range(0, len(names), per)],
                           extra_files={"tokenizer.json": '{"version": "1.0"}'})
