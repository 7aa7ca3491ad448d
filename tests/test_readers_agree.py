"""One validation for every reader (issue 17): damaged checkpoints are refused by all readers alike.

Each test damages a real conversion (or a source) the way the issue found it, then runs every reader
(``readers.run_readers``: CLI inspect / verify / dequantize, ``load_state_dict``, the transformers
loader's entry points) and requires a clean, one-line, common verdict.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import exmyconv
from conftest import Raw, make_checkpoint, read_safetensors, write_safetensors
from readers import agree, run_readers

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def converted(tmp_path, rng):
    """A sharded e2m2 conversion (2 files + index + config.json) of a small source."""
    t = {"blk.0.w.weight": rng.standard_normal((6, 80)).astype(np.float32),
         "blk.1.w.weight": rng.standard_normal((6, 80)).astype(np.float32),
         "blk.0.norm.weight": rng.standard_normal(80).astype(np.float32)}
    src = make_checkpoint(tmp_path / "src", t, config={"model_type": "x"})
    out = tmp_path / "q"
    exmyconv.quantize(str(src), str(out), max_shard_size=1000, progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    assert agree(run_readers(out)).ok
    return out


def shard_of(out: Path, tensor: str) -> Path:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return out / index["weight_map"][tensor]


def edit(path: Path, meta=None, tensors=None) -> None:
    """Rewrite a safetensors file with edited metadata / tensors (conftest's independent writer)."""
    metadata, ts, _ = read_safetensors(path)
    ts = {k: Raw(*v) for k, v in ts.items()}
    if meta:
        meta(metadata)
    if tensors:
        tensors(ts)
    write_safetensors(path, ts, metadata)


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def refused(out, needle: str, transformers: bool = True) -> str:
    verdict = agree(run_readers(out, transformers=transformers))
    assert not verdict.ok and needle in verdict.message, verdict.message
    return verdict.message


# --------------------------------------------------------------------------- scales


def _set_scale(value, dtype="<f2"):
    def fn(ts):
        scale = ts["blk.0.w.weight_scale"]
        a = np.frombuffer(scale.data, dtype=dtype).copy()
        a[1] = value
        ts["blk.0.w.weight_scale"] = Raw(scale.dtype, scale.shape, a.tobytes())
    return fn


@pytest.mark.parametrize("value", [0.0, -0.0, -0.5, np.nan, np.inf, 2.0 ** -20])  # 2^-20: an fp16 subnormal
def test_bad_scales_refused_by_every_reader(converted, value):
    edit(shard_of(converted, "blk.0.w.weight_scale"), tensors=_set_scale(value))
    refused(converted, "blk.0.w.weight: scales")


def test_bf16_scale_that_overflows_float32_is_refused(converted):
    """A finite bf16 scale whose product with the format's max is not finite in float32."""
    path = shard_of(converted, "blk.0.w.weight_scale")
    big = np.uint16(0x7F7F)  # bf16 3.39e38; x 7 (e2m2's max) overflows float32

    def to_bf16(ts):
        scale = ts["blk.0.w.weight_scale"]
        a = np.frombuffer(scale.data, dtype="<f2").astype(np.float32).view(np.uint32) >> 16
        a = a.astype(np.uint16)
        a[0] = big
        ts["blk.0.w.weight_scale"] = Raw("BF16", scale.shape, a.tobytes())
    edit(path, tensors=to_bf16)
    refused(converted, "blk.0.w.weight: scales")


# --------------------------------------------------------------------------- versions


def test_shared_format_in_a_layout_1_0_file(tmp_path, rng):
    """SPEC section 5: a shared format in a file that says 1.0 is refused, by every reader."""
    src = make_checkpoint(tmp_path / "src", {"w.weight": rng.standard_normal((4, 64)).astype(np.float32)})
    out = tmp_path / "q"
    exmyconv.quantize(str(src), str(out), format="e2m2s4", progress=False)
    edit(out / "model.safetensors", meta=lambda m: m.update(exmy_version="1.0"))
    refused(out, "shared format e2m2s4 in a layout 1.0 file")


@pytest.mark.parametrize("version", ["3.0", "1", "x", "", "1.1.1", "9" * 5000 + ".1"])
def test_unreadable_layout_versions(converted, version):
    edit(shard_of(converted, "blk.0.w.weight_scale"), meta=lambda m: m.update(exmy_version=version))
    refused(converted, "exmy layout version")


def test_records_without_a_version(converted):
    edit(shard_of(converted, "blk.0.w.weight_scale"), meta=lambda m: m.pop("exmy_version"))
    refused(converted, "no exmy_version")


# --------------------------------------------------------------------------- index vs shards


def test_index_names_the_wrong_shard(converted):
    other = next(p for p in converted.glob("model-*.safetensors") if p != shard_of(converted, "blk.0.w.weight_packed"))
    edit_json(converted / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({"blk.0.w.weight_packed": other.name}))
    refused(converted, "'blk.0.w.weight_packed'")


def test_index_names_a_tensor_no_shard_holds(converted):
    first = shard_of(converted, "blk.0.w.weight_packed").name
    edit_json(converted / "model.safetensors.index.json", lambda d: d["weight_map"].update({"ghost.weight": first}))
    refused(converted, "'ghost.weight'")


def test_index_leaves_out_a_stored_tensor(converted):
    edit_json(converted / "model.safetensors.index.json", lambda d: d["weight_map"].pop("blk.0.w.weight_scale"))
    refused(converted, "does not list")


def test_inspect_of_a_plain_source_reports_what_quantize_rejects(run_cli, tmp_path, rng):
    t = {"a.weight": rng.standard_normal((4, 32)).astype(np.float32),
         "b.weight": rng.standard_normal((4, 32)).astype(np.float32)}
    src = make_checkpoint(tmp_path / "src", t, shards=[["a.weight"], ["b.weight"]])
    index = src / "model.safetensors.index.json"
    for change in ({"ghost.weight": "model-00001-of-00002.safetensors"},
                   {"b.weight": "model-00001-of-00002.safetensors"}):
        data = json.loads(index.read_text())
        data["weight_map"].update(change)
        index.write_text(json.dumps(data))
        code, _, err = run_cli("quantize", src, tmp_path / "out")
        assert code == 1 and not (tmp_path / "out").exists()
        rejected = err.strip().removeprefix(f"error: {src}: ")
        verdict = agree(run_readers(src, exmy=False))
        assert not verdict.ok and verdict.message == rejected, (verdict.message, rejected)
        make_checkpoint(src, t, shards=[["a.weight"], ["b.weight"]])  # repair for the next change


# --------------------------------------------------------------------------- internal errors that were


def deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


def test_deeply_nested_json_in_a_header(converted):
    path = shard_of(converted, "blk.0.w.weight_packed")
    raw = ('{"a": ' + deep() + "}").encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    refused(converted, "nested deeper than")


def test_deeply_nested_json_in_a_metadata_record(converted):
    edit(shard_of(converted, "blk.0.w.weight_packed"), meta=lambda m: m.update({"exmy:blk.0.w.weight": deep()}))
    refused(converted, "nested deeper than")


@pytest.mark.parametrize("where", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_json_in_config_and_index(converted, where):
    (converted / where).write_text('{"x": ' + deep() + "}")
    refused(converted, "nested deeper than", transformers=where != "config.json")


def test_zero_element_tensor_with_a_huge_dimension(converted):
    edit(shard_of(converted, "blk.0.norm.weight"), tensors=lambda ts: ts.update(z=Raw("F32", [0, 2**70], b"")))
    refused(converted, "bad shape")


@pytest.mark.parametrize("value", [5, None, ["a"], {"a": 1}])
def test_index_values_that_are_not_strings(converted, value):
    edit_json(converted / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({"blk.0.norm.weight": value}))
    refused(converted, "not a file name")


@pytest.mark.parametrize("value", [[1], "exmy", 5])
def test_quantization_config_not_an_object(converted, value):
    edit_json(converted / "config.json", lambda d: d.update(quantization_config=value))
    refused(converted, "quantization_config is", transformers=False)  # transformers itself fails first there


@pytest.mark.parametrize("field,value,needle", [
    ("group_size", "1e999", "group_size"), ("group_size", "0", "group_size"), ("group_size", "64.0", "group_size"),
    ("group_size", "true", "group_size"), ("ignore", "5", "ignore"), ("ignore", '"lm_head.weight"', "ignore"),
    ("ignore", "[1]", "ignore"), ("format", '"E2M2"', "format"), ("format", '"e9m9"', "format"),
    ("format", "null", "format"), ("format_version", '"3.0"', "version"), ("format_version", "1.1", "version"),
    ("tied", "[]", "tied"), ("exmyconv_version", "1", "exmyconv_version")])
def test_bad_quantization_config_values(converted, field, value, needle):
    config = converted / "config.json"
    data = json.loads(config.read_text())
    text = json.dumps(data).replace(f'"{field}": {json.dumps(data["quantization_config"][field])}',
                                    f'"{field}": {value}')
    assert text != json.dumps(data)
    config.write_text(text)
    refused(converted, needle)


@pytest.mark.parametrize("value", [1, ["exmyconv", "quantize"], {"argv": []}])
def test_command_that_is_not_a_string(converted, value):
    """quantization_config.command (SPEC section 4, optional): a string when present; every reader agrees."""
    edit_json(converted / "config.json", lambda d: d["quantization_config"].update(command=value))
    refused(converted, "command")


def test_command_string_or_absent_is_valid(converted):
    """A checkpoint without `command` (the Python API, or older exmyconv) and one with it both load."""
    assert "command" not in json.loads((converted / "config.json").read_text())["quantization_config"]
    edit_json(converted / "config.json", lambda d: d["quantization_config"].update(command="exmyconv quantize a b"))
    assert agree(run_readers(converted)).ok


def test_format_auto_is_valid(converted):
    edit_json(converted / "config.json", lambda d: d["quantization_config"].update(format="auto"))
    assert agree(run_readers(converted)).ok


def test_ignore_not_a_list_from_transformers_config_is_a_clean_error():
    from exmyconv.integrations.transformers_impl import ExmyConfig

    for bad in ({"ignore": 5}, {"ignore": "x"}, {"group_size": float("inf")}, {"format": 5}):
        with pytest.raises(ValueError, match="quantization_config") as info:
            ExmyConfig.from_dict({"quant_method": "exmy", "format": "e2m2", "format_version": "1.1", **bad})
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- records


@pytest.mark.parametrize("change,needle", [
    ({"shape": [480]}, "shape"), ({"shape": [6, 0]}, "shape"), ({"group_size": 81}, "group_size"),
    ({"group_size": 0}, "group_size"), ({"group_size": 80.0}, "group_size"), ({"dtype": "I32"}, "dtype"),
    ({"dtype": 5}, "dtype"), ({"format": "E2M2"}, "format"), ({"format": " e2m2"}, "format"),
    ({"rel_error": "0.1"}, "rel_error"), ({"rel_error": -1}, "rel_error"), ({"shape": True}, "shape")])
def test_bad_records(converted, change, needle):
    path = shard_of(converted, "blk.0.w.weight_packed")

    def fn(meta):
        d = json.loads(meta["exmy:blk.0.w.weight"])
        d.update(change)
        meta["exmy:blk.0.w.weight"] = json.dumps(d)
    edit(path, meta=fn)
    refused(converted, needle)


@pytest.mark.parametrize("field", ["format", "shape", "dtype", "group_size"])
def test_records_need_every_field(converted, field):
    def fn(meta):
        d = json.loads(meta["exmy:blk.0.w.weight"])
        d.pop(field)
        meta["exmy:blk.0.w.weight"] = json.dumps(d)
    edit(shard_of(converted, "blk.0.w.weight_packed"), meta=fn)
    refused(converted, repr(field))


def test_names_with_line_breaks_give_one_line(converted):
    path = shard_of(converted, "blk.0.w.weight_packed")
    edit(path, tensors=lambda ts: ts.update({"evil\nname_packed": Raw("U8", [1], b"\0")}))
    message = refused(converted, "evil\\nname_packed")
    assert "\n" not in message


def test_from_pretrained_refuses_bad_scales(tmp_path):
    """The transformers loader used to skip the scale check: a zero scale loaded silently."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from exmyconv.errors import ExmyError

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    out = tmp_path / "q"
    exmyconv.quantize(str(tmp_path / "src"), str(out), progress=False)
    name = "model.layers.0.mlp.up_proj.weight_scale"

    def zero(ts):
        scale = ts[name]
        ts[name] = Raw(scale.dtype, scale.shape, bytes(len(scale.data)))
    edit(out / "model.safetensors", tensors=zero)
    with pytest.raises(ExmyError, match="up_proj.weight: scales"):
        transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)


def test_no_numpy_warnings_in_a_fresh_process(converted, tmp_path):
    """A signalling-NaN scale, and an fp16 dequantization that overflows (allowed: SPEC section 2), must
    not add numpy RuntimeWarning lines to what a user sees (found by the fuzzer)."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "exmyconv", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=120)

    edit(shard_of(converted, "blk.0.w.weight_scale"), tensors=_set_scale(np.uint16(0x7D00).view(np.float16)))
    done = run("inspect", converted)
    assert done.returncode == 2 and "Warning" not in done.stderr and not done.stderr.strip(), done.stderr
    src = make_checkpoint(tmp_path / "big", {"w.weight": np.full((2, 64), 1e6, np.float32)})
    exmyconv.quantize(str(src), str(tmp_path / "bigq"), progress=False)
    done = run("dequantize", tmp_path / "bigq", tmp_path / "fp", "--dtype", "float16")
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr
