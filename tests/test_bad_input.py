"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and nothing left behind."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import exmyconv
from conftest import Raw, make_checkpoint, read_safetensors, tree_snapshot, write_safetensors
from exmyconv.io.checkpoint import Checkpoint
from exmyconv.torch.state_dict import load_state_dict
from exmyconv.errors import ExmyError

# --------------------------------------------------------------------------- helpers

_OPENED: list[str] = []
_WATCH: set[str] = set()


def _audit(event, args):
    if event == "open" and _WATCH and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if any(path.endswith(w) for w in _WATCH):
            _OPENED.append(path)


sys.addaudithook(_audit)


def one_line_error(code, out, err, *, needle=None):
    assert code not in (0, None), (code, out, err)
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("error:"), f"not a clean user error: {lines[0]!r}"
    if needle is not None:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def quantize_fails(run_cli, tmp_path, src, *args, needle=None, out=None):
    """Run quantize on src; check the failure is clean and that nothing at all changed on disk."""
    out = out or tmp_path / "out"
    before = tree_snapshot(tmp_path)
    code, stdout, err = run_cli("quantize", src, out, *args)
    line = one_line_error(code, stdout, err, needle=needle)
    assert not Path(out).exists(), "OUT_DIR must not be created"
    assert tree_snapshot(tmp_path) == before, "no temp dir or other file may be left behind"
    return line


def good_tensors(rng):
    return {"layer.weight": rng.standard_normal((8, 64)).astype(np.float32),
            "layer.bias": rng.standard_normal(8).astype(np.float32)}


def header_file(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


# --------------------------------------------------------------------------- missing and broken sources

def test_missing_dir(run_cli, tmp_path):
    quantize_fails(run_cli, tmp_path, tmp_path / "nope", needle="nope")


def test_dir_without_safetensors(run_cli, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    quantize_fails(run_cli, tmp_path, src, needle="safetensors")
    (src / "config.json").write_text("{}")
    (src / "README.md").write_text("hi")
    quantize_fails(run_cli, tmp_path, src, needle="safetensors")


def test_source_is_a_file(run_cli, tmp_path, rng):
    f = write_safetensors(tmp_path / "model.safetensors", good_tensors(rng))
    quantize_fails(run_cli, tmp_path, f)


@pytest.mark.parametrize("garbage", [b"{not json!!", b"[1, 2, 3]", b"\xff\xfe\x00garbage", b'{"a": 1}',
                                     b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]}}',
                                     b'{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}',
                                     b'{"__metadata__": {"k": 5}}'])
def test_corrupted_header(run_cli, tmp_path, garbage):
    src = tmp_path / "src"
    src.mkdir()
    header_file(src / "model.safetensors", garbage, b"\0" * 8)
    quantize_fails(run_cli, tmp_path, src, needle="model.safetensors")


def test_truncated_file(run_cli, tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", good_tensors(rng))
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    quantize_fails(run_cli, tmp_path, src, needle="model.safetensors")
    f.write_bytes(f.read_bytes()[:5])  # not even a length
    quantize_fails(run_cli, tmp_path, src, needle="model.safetensors")


@pytest.mark.parametrize("length", [10**6, 2**63, 2**64 - 1])
def test_header_length_larger_than_file(run_cli, tmp_path, length):
    src = tmp_path / "src"
    src.mkdir()
    header_file(src / "model.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                b"\0" * 8, length=length)
    quantize_fails(run_cli, tmp_path, src, needle="model.safetensors")


@pytest.mark.parametrize("shape,offsets", [
    ([2**20, 2**20], [0, 16]),  # a 4 TiB shape over 16 bytes
    ([2**20, 2**20], [0, 4 * 2**40]),  # consistent with the shape, but the file is tiny
    ([2**62, 2**62], [0, 16]),  # overflows int64
    ([4, 4], [0, 64]),  # offsets past the end
])
def test_lying_header_does_not_allocate(run_cli, tmp_path, shape, offsets):
    src = tmp_path / "src"
    src.mkdir()
    header_file(src / "model.safetensors",
                {"big.weight": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}, b"\0" * 16)
    tracemalloc.start()
    try:
        quantize_fails(run_cli, tmp_path, src, needle="big.weight")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"peak traced allocation {peak} bytes"
    with pytest.raises(ExmyError):
        Checkpoint(str(src))


def test_overlapping_tensors(run_cli, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    header_file(src / "model.safetensors",
                {"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                 "b.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, b"\0" * 24)
    quantize_fails(run_cli, tmp_path, src)


def test_unsupported_dtype(run_cli, tmp_path, rng):
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "model.safetensors",
                      {"ok.weight": rng.standard_normal((4, 8)).astype(np.float32),
                       "fp8.weight": Raw("F8_E4M3", [4, 4], bytes(16))})
    line = quantize_fails(run_cli, tmp_path, src, needle="F8_E4M3")
    assert "fp8.weight" in line


# --------------------------------------------------------------------------- index

def sharded(tmp_path, rng):
    t = {"a.weight": rng.standard_normal((4, 32)).astype(np.float32),
         "b.weight": rng.standard_normal((4, 32)).astype(np.float32),
         "c.bias": rng.standard_normal(4).astype(np.float32)}
    src = make_checkpoint(tmp_path / "src", t, shards=[["a.weight"], ["b.weight", "c.bias"]])
    return src, src / "model.safetensors.index.json"


def test_index_naming_a_missing_shard(run_cli, tmp_path, rng):
    src, index = sharded(tmp_path, rng)
    (src / "model-00002-of-00002.safetensors").unlink()
    quantize_fails(run_cli, tmp_path, src, needle="model-00002-of-00002.safetensors")


def test_index_naming_a_tensor_not_in_its_shard(run_cli, tmp_path, rng):
    src, index = sharded(tmp_path, rng)
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    quantize_fails(run_cli, tmp_path, src, needle="ghost.weight")
    data["weight_map"].pop("ghost.weight")
    data["weight_map"]["b.weight"] = "model-00001-of-00002.safetensors"  # it is in shard 2
    index.write_text(json.dumps(data))
    quantize_fails(run_cli, tmp_path, src, needle="b.weight")


@pytest.mark.parametrize("content", ["not json", "[]", '{"weight_map": {}}', '{"weight_map": {"a": "../x"}}'])
def test_broken_index(run_cli, tmp_path, rng, content):
    src, index = sharded(tmp_path, rng)
    index.write_text(content)
    quantize_fails(run_cli, tmp_path, src, needle="index")


def test_duplicate_tensor_across_shards(run_cli, tmp_path, rng):
    src = tmp_path / "src"
    src.mkdir()
    t = rng.standard_normal((4, 32)).astype(np.float32)
    write_safetensors(src / "a.safetensors", {"w.weight": t})
    write_safetensors(src / "b.safetensors", {"w.weight": t})
    quantize_fails(run_cli, tmp_path, src, needle="w.weight")


# --------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_in_a_weight(run_cli, tmp_path, rng, dtype, bad):
    t = {"fine.weight": rng.standard_normal((300, 64)).astype(dtype),
         "model.layers.7.mlp.gate_proj.weight": rng.standard_normal((300, 64)).astype(dtype)}
    t["model.layers.7.mlp.gate_proj.weight"][211, 17] = bad
    src = make_checkpoint(tmp_path / "src", t, config={"model_type": "x"})
    quantize_fails(run_cli, tmp_path, src, needle="model.layers.7.mlp.gate_proj.weight")


def test_failure_during_writing_leaves_no_parent_dirs(run_cli, tmp_path, rng):
    """A NaN is only found while writing: OUT_DIR's missing parents must not stay behind either."""
    t = {"w.weight": rng.standard_normal((4, 64)).astype(np.float32)}
    t["w.weight"][1, 1] = np.nan
    src = make_checkpoint(tmp_path / "src", t)
    quantize_fails(run_cli, tmp_path, src, needle="w.weight", out=tmp_path / "new" / "deeper" / "out")


def test_already_exmy_source(run_cli, tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", good_tensors(rng))
    exmyconv.quantize(str(src), str(tmp_path / "q"), progress=False)
    quantize_fails(run_cli, tmp_path, tmp_path / "q", needle="exmy", out=tmp_path / "qq")


# --------------------------------------------------------------------------- bad options

@pytest.mark.parametrize("name", ["e9m9", "fp4", "e4m4", "e0m2", "nvfp4"])
def test_unknown_format_name(run_cli, tmp_path, rng, name):
    src = make_checkpoint(tmp_path / "src", good_tensors(rng))
    quantize_fails(run_cli, tmp_path, src, "--format", name, needle=name)


@pytest.mark.parametrize("size", ["0", "-1", "-128"])
def test_bad_group_size(run_cli, tmp_path, rng, size):
    src = make_checkpoint(tmp_path / "src", good_tensors(rng))
    quantize_fails(run_cli, tmp_path, src, "--group-size", size, needle="group")


@pytest.mark.parametrize("args", [("--max-shard-size", "lots"), ("--max-shard-size", "0"), ("--skip", "(unclosed")])
def test_other_bad_options(run_cli, tmp_path, rng, args):
    src = make_checkpoint(tmp_path / "src", good_tensors(rng))
    quantize_fails(run_cli, tmp_path, src, *args)


# --------------------------------------------------------------------------- pickles

class _Trap:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (self.marker, "w"))


def test_pickle_only_dir_is_never_opened(run_cli, tmp_path):
    # the trap is live: unpickling it really creates its marker
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Trap(probe))).close()
    assert probe.exists()
    probe.unlink()

    # the audit hook is live: it sees an open of a watched name
    _OPENED.clear()
    _WATCH.add("probe.bin")
    try:
        (tmp_path / "probe.bin").write_bytes(b"")
    finally:
        _WATCH.clear()
    assert _OPENED and (tmp_path / "probe.bin").unlink() is None

    src = tmp_path / "src"
    src.mkdir()
    marker = tmp_path / "UNPICKLED"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    (src / "config.json").write_text('{"model_type": "bert"}')
    before = tree_snapshot(tmp_path)
    _OPENED.clear()
    _WATCH.add("pytorch_model.bin")
    try:
        quantize = run_cli("quantize", src, tmp_path / "out")
        inspect = run_cli("inspect", src)
        with pytest.raises(ExmyError):
            load_state_dict(str(src))
    finally:
        _WATCH.clear()
    assert not marker.exists(), "the pickle was unpickled"
    assert _OPENED == [], f"the pickle file was opened: {_OPENED}"
    one_line_error(*quantize, needle="pytorch_model.bin")
    one_line_error(*inspect, needle="pickle")
    assert tree_snapshot(tmp_path) == before


# --------------------------------------------------------------------------- OUT_DIR

def test_non_empty_out_dir_needs_overwrite(run_cli, tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", good_tensors(rng))
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = tree_snapshot(tmp_path)
    code, stdout, err = run_cli("quantize", src, out)
    one_line_error(code, stdout, err, needle="--overwrite")
    assert tree_snapshot(tmp_path) == before
    code, stdout, err = run_cli("quantize", src, out, "--overwrite")
    assert code == 0, err
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("src", "out")]
    assert leftovers == []
    assert exmyconv.inspect(str(out))["intact"]


def test_empty_out_dir_is_fine(run_cli, tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", good_tensors(rng))
    (tmp_path / "out").mkdir()
    code, _, err = run_cli("quantize", src, tmp_path / "out")
    assert code == 0, err


def test_out_dir_is_a_file(run_cli, tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", good_tensors(rng))
    (tmp_path / "out").write_text("a file")
    before = tree_snapshot(tmp_path)
    for extra in ((), ("--overwrite",)):
        code, out, err = run_cli("quantize", src, tmp_path / "out", *extra)
        one_line_error(code, out, err)
        assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_dir_is_or_contains_the_source(run_cli, tmp_path, rng, where, overwrite):
    src = make_checkpoint(tmp_path / "model" / "src", good_tensors(rng), config={"model_type": "x"})
    out = {"same": src, "inside": src / "quantized", "parent": tmp_path / "model"}[where]
    before = tree_snapshot(tmp_path)
    code, stdout, err = run_cli("quantize", src, out, *(["--overwrite"] if overwrite else []))
    one_line_error(code, stdout, err)
    assert tree_snapshot(tmp_path) == before, "the source must be untouched"


def test_same_dir_spelled_differently(run_cli, tmp_path, rng, monkeypatch):
    src = make_checkpoint(tmp_path / "src", good_tensors(rng))
    monkeypatch.chdir(tmp_path)
    before = tree_snapshot(tmp_path)
    code, out, err = run_cli("quantize", "src", "./src/../src/", "--overwrite")
    one_line_error(code, out, err)
    assert tree_snapshot(tmp_path) == before


# --------------------------------------------------------------------------- damaged exmy checkpoints

@pytest.fixture
def converted(tmp_path, rng):
    t = {"blk.0.w.weight": rng.standard_normal((6, 80)).astype(np.float32),
         "blk.0.norm.weight": rng.standard_normal(80).astype(np.float32)}
    src = make_checkpoint(tmp_path / "src", t, config={"model_type": "x"})
    out = tmp_path / "q"
    exmyconv.quantize(str(src), str(out), progress=False)
    return out


def _edit_meta(path, fn):
    meta, ts, _ = read_safetensors(path)
    key = "exmy:blk.0.w.weight"
    d = json.loads(meta[key])
    new = fn(d)
    meta[key] = new if isinstance(new, str) else json.dumps(d)
    write_safetensors(path, {k: Raw(*v) for k, v in ts.items()}, meta)


def _drop_tensor(path, name):
    meta, ts, _ = read_safetensors(path)
    write_safetensors(path, {k: Raw(*v) for k, v in ts.items() if k != name}, meta)


DAMAGE = {
    "format not a string": lambda p: _edit_meta(p, lambda d: d.update(format=5)),
    "format unknown": lambda p: _edit_meta(p, lambda d: d.update(format="e9m9")),
    "format missing": lambda p: _edit_meta(p, lambda d: d.pop("format")),
    "metadata not json": lambda p: _edit_meta(p, lambda d: "{oops"),
    "metadata a list": lambda p: _edit_meta(p, lambda d: "[1, 2]"),
    "group size 0": lambda p: _edit_meta(p, lambda d: d.update(group_size=0)),
    "group size text": lambda p: _edit_meta(p, lambda d: d.update(group_size="x")),
    "shape wrong": lambda p: _edit_meta(p, lambda d: d.update(shape=[6, 300])),
    "shape negative": lambda p: _edit_meta(p, lambda d: d.update(shape=[-6, 80])),
    "shape not a list": lambda p: _edit_meta(p, lambda d: d.update(shape=80)),
    "scale missing": lambda p: _drop_tensor(p, "blk.0.w.weight_scale"),
    "packed missing": lambda p: _drop_tensor(p, "blk.0.w.weight_packed"),
    "zeroed scale": lambda p: write_safetensors(p, {
        k: Raw(v[0], v[1], bytes(len(v[2])) if k.endswith("_scale") else v[2])
        for k, v in read_safetensors(p)[1].items()}, read_safetensors(p)[0]),
    "garbage file": lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{{{{{{{{{{{{{"),
    "truncated file": lambda p: p.write_bytes(p.read_bytes()[:-50]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_exmy_checkpoint(run_cli, converted, damage):
    DAMAGE[damage](converted / "model.safetensors")
    code, out, err = run_cli("inspect", converted)
    assert code not in (0, None), (damage, out, err)
    assert "Traceback" not in out + err and "internal error" not in err, err
    if err.strip():  # unreadable: one line
        one_line_error(code, out, err)
    else:  # readable but damaged: the report names the problem
        assert "problem" in out
    with pytest.raises(ExmyError) as info:
        load_state_dict(str(converted))
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- a real process

def test_console_script_real_process(tmp_path):
    exe = shutil.which("exmyconv", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "exmyconv"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run([*cmd, "quantize", str(tmp_path / "missing"), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=120)
    one_line_error(res.returncode, res.stdout, res.stderr)
    assert res.returncode == 1 and not (tmp_path / "out").exists()


def test_failed_overwrite_keeps_the_old_out_dir(run_cli, tmp_path, rng):
    t = good_tensors(rng)
    t["layer.weight"][3, 3] = np.inf
    src = make_checkpoint(tmp_path / "src", t)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = tree_snapshot(tmp_path)
    code, stdout, err = run_cli("quantize", src, out, "--overwrite")
    one_line_error(code, stdout, err, needle="layer.weight")
    assert tree_snapshot(tmp_path) == before


def test_interrupt_leaves_nothing(run_cli, tmp_path, rng, monkeypatch):
    from exmyconv.convert import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "copy_item", interrupted)
    src = make_checkpoint(tmp_path / "src", good_tensors(rng))
    before = tree_snapshot(tmp_path)
    code, stdout, err = run_cli("quantize", src, tmp_path / "out")
    assert code == 130 and "Traceback" not in stdout + err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1 and "interrupted" in err
    assert tree_snapshot(tmp_path) == before


# --------------------------------------------------------------------------- issue 17: smaller defects

@pytest.mark.parametrize("fifo", ["model.safetensors", "model-00002-of-00002.safetensors", "config.json",
                                  "model.safetensors.index.json"])
def test_a_fifo_never_blocks(tmp_path, rng, fifo):
    """A shard (or config / index) that is a FIFO: a clean error, not a reader blocked forever."""
    if fifo == "model.safetensors":
        src = make_checkpoint(tmp_path / "src", good_tensors(rng), config={"model_type": "x"})
    else:
        src, _ = sharded(tmp_path, rng)
        (src / "config.json").write_text('{"model_type": "x"}')
    (src / fifo).unlink()
    os.mkfifo(src / fifo)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), PYTHONWARNINGS="ignore")
    for args in (["quantize", str(src), str(tmp_path / "out")], ["inspect", str(src)]):
        res = subprocess.run([sys.executable, "-m", "exmyconv", *args], capture_output=True, text=True, env=env,
                             timeout=60)
        one_line_error(res.returncode, res.stdout, res.stderr, needle=fifo)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tokens", ["0", "-5"])
def test_calibration_tokens_must_be_positive(run_cli, tmp_path, rng, tokens):
    src = make_checkpoint(tmp_path / "src", good_tensors(rng))
    text = tmp_path / "calib.txt"
    text.write_text("some text to calibrate on\n")
    quantize_fails(run_cli, tmp_path, src, "--format", "auto", "--bits", "6", "--calibration", text,
                   "--calibration-tokens", tokens, needle="--calibration-tokens")


@pytest.mark.parametrize("what", ["plain checkpoint", "empty folder", "plain file"])
def test_verify_refuses_what_is_not_an_exmy_checkpoint(run_cli, tmp_path, rng, what):
    src = make_checkpoint(tmp_path / "src", good_tensors(rng), config={"model_type": "x"})
    target = {"plain checkpoint": src, "empty folder": tmp_path / "empty",
              "plain file": src / "model.safetensors"}[what]
    if what == "empty folder":
        target.mkdir()
    code, out, err = run_cli("verify", target)
    one_line_error(code, out, err)
    assert code == 1 and "verified" not in out
