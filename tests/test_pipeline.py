"""End to end: convert -> files on disk (SPEC section 4) -> read back, against the in-memory reference
quantizer and a spec-only reader (raw safetensors parsing + spec_unpack + spec_table)."""
from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file as st_load_file

import exmyconv
from conftest import (Raw, as_array, make_checkpoint, read_safetensors, spec_table, spec_unpack, to_f32,
                      tree_snapshot, write_safetensors)
from exmyconv.format import exmy as formats
from exmyconv.convert import pipeline
from exmyconv.format import quant
from exmyconv.format.layout import GUARD_VALUE
from exmyconv.io.checkpoint import Checkpoint
from exmyconv.torch.state_dict import load_state_dict
from exmyconv.errors import ExmyError

QUANTIZABLE = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
               "model.layers.0.self_attn.q_proj.weight", "model.layers.0.experts.weight"]
EMBEDDINGS = ["model.embed_tokens.weight", "lm_head.weight"]
KEPT_ALWAYS = ["model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.bias", "model.position_ids"]
TORCH_OF = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def convert(src, out, **kw):
    kw.setdefault("progress", False)
    return exmyconv.quantize(str(src), str(out), **kw)


def read_dir(out):
    """name -> (dtype, shape, bytes, file name); file name -> file metadata."""
    tensors, metas = {}, {}
    for path in sorted(out.glob("*.safetensors")):
        meta, ts, _ = read_safetensors(path)
        metas[path.name] = meta
        for name, (dtype, shape, data) in ts.items():
            assert name not in tensors, f"{name} stored twice"
            tensors[name] = (dtype, shape, data, path.name)
    return tensors, metas


def spec_decode(meta: dict, packed, scale) -> np.ndarray:
    """Dequantize one stored tensor with nothing but SPEC: float64, exact."""
    e, m = map(int, re.fullmatch(r"e(\d)m(\d)", meta["format"]).groups())
    shape, g = meta["shape"], meta["group_size"]
    k = shape[-1]
    codes = spec_unpack(as_array("U8", packed[1], packed[2]), 1 + e + m, k)[..., :k].reshape(-1, k)
    s = as_array(scale[0], scale[1], scale[2]).astype(np.float64).reshape(codes.shape[0], -1)
    s = np.repeat(s, g, axis=1)[:, :k]
    return (spec_table(e, m)[codes] * s).reshape(shape)


def check_quantized(out, src_tensors, name, fmt_name, group_size):
    """Everything SPEC 4 says about one quantized tensor; returns its exact float64 values."""
    tensors, metas = read_dir(out)
    assert name not in tensors, f"{name} should be replaced by _packed/_scale"
    packed, scale = tensors[name + "_packed"], tensors[name + "_scale"]
    fname = packed[3]
    assert scale[3] == fname, "packed and scale live in one file"
    fmeta = metas[fname]
    assert fmeta["format"] == "pt" and fmeta["exmy_version"] == "2.0"
    meta = json.loads(fmeta["exmy:" + name])
    src = np.asarray(src_tensors[name])
    src_dtype = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                 np.dtype(ml_dtypes.bfloat16): "BF16"}[src.dtype]
    k = src.shape[-1]
    g = k if group_size is None or group_size >= k else group_size
    fmt = formats.get_format(fmt_name)
    assert meta["format"] == fmt_name and meta["shape"] == list(src.shape)
    assert meta["dtype"] == src_dtype and meta["group_size"] == g
    assert packed[0] == "U8" and packed[1] == (*src.shape[:-1], 32 * -(-k // 32) * fmt.bits // 8)
    assert scale[0] in ("F16", "BF16") and scale[1] == (*src.shape[:-1], -(-k // g))
    values = spec_decode(meta, packed, scale)
    assert np.isfinite(values).all()
    # the in-memory reference, bit for bit (float32 output is exact)
    ref = quant.quantize(to_f32(src), fmt, group_size)
    assert ref.scale_dtype == scale[0]
    assert np.array_equal(ref.dequantize().astype(np.float64), values)
    # every element written: the row padding of every plane holds code 0
    full = spec_unpack(as_array("U8", packed[1], packed[2]), fmt.bits, k)
    assert not full[..., k:].any()
    # rel_error: ||W - W'|| / ||W|| (informative, float32 arithmetic; 0 for an all-zero W)
    w = to_f32(src).astype(np.float64)
    norm = np.linalg.norm(w)
    rel = np.linalg.norm(w - values) / norm if norm > 0 else 0.0
    assert np.isfinite(meta["rel_error"])
    assert meta["rel_error"] == pytest.approx(rel, rel=1e-4, abs=1e-12)
    return values


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("fmt_name,group_size", [("e2m2", None), ("e2m2", 32), ("e2m1", 64), ("e3m2", 100),
                                                 ("e4m3", None), ("e3m1", 7), ("e2m3", 1000)])
def test_convert_then_read_equals_in_memory_reference(small_source, tmp_path, fmt_name, group_size):
    src, tensors, _ = small_source
    out = tmp_path / "out"
    summary = convert(src, out, format=fmt_name, group_size=group_size)
    assert summary.quantized == len(QUANTIZABLE) and summary.tensors == len(tensors)
    sd = load_state_dict(str(out))
    assert set(sd) == set(tensors)
    with Checkpoint(str(out)) as ckpt:
        ckpt.check()
        for name in QUANTIZABLE:
            exact = check_quantized(out, tensors, name, fmt_name, group_size)
            src_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[np.asarray(tensors[name]).dtype.name]
            # load_state_dict: source dtype, values = exact rounded once to it
            t = sd[name]
            assert t.dtype == TORCH_OF[src_dtype] and tuple(t.shape) == np.asarray(tensors[name]).shape
            want = torch.from_numpy(exact.astype(np.float32)).to(TORCH_OF[src_dtype])
            assert torch.equal(t, want)
            assert np.array_equal(ckpt.dequantize(name).astype(np.float64), exact)
            assert torch.isfinite(t.float()).all()
    # a standard safetensors reader accepts every output file
    for f in out.glob("*.safetensors"):
        st_load_file(str(f))


def test_chunked_streaming_gives_the_same_bytes(small_source, tmp_path, monkeypatch):
    src, _, _ = small_source
    convert(src, tmp_path / "whole", group_size=32)
    monkeypatch.setattr(pipeline, "CHUNK_ELEMENTS", 300)  # many small row chunks per tensor
    convert(src, tmp_path / "chunked", group_size=32)
    a, meta_a = read_dir(tmp_path / "whole")
    b, meta_b = read_dir(tmp_path / "chunked")
    assert a == b, "tensor bytes do not depend on the chunking"
    # metadata too, except the last digit of rel_error (a sum whose order follows the chunks)
    for fname, meta in meta_a.items():
        assert meta.keys() == meta_b[fname].keys()
        for key, value in meta.items():
            if key.startswith("exmy:"):
                x, y = json.loads(value), json.loads(meta_b[fname][key])
                assert x.pop("rel_error") == pytest.approx(y.pop("rel_error"), rel=1e-4)
                assert x == y
            else:
                assert value == meta_b[fname][key]


def test_sources_of_each_float_dtype_and_3d(tmp_path, rng):
    tensors = {
        "a.f32": rng.standard_normal((5, 130)).astype(np.float32),
        "a.f16": (rng.standard_normal((7, 129)) * 1e-3).astype(np.float16),
        "a.bf16": (rng.standard_normal((4, 300)) * 50).astype(ml_dtypes.bfloat16),
        "a.bf16_3d": rng.standard_normal((2, 3, 64)).astype(ml_dtypes.bfloat16),
        "a.f16_3d": rng.standard_normal((3, 2, 200)).astype(np.float16),
        "a.f32_3d": rng.standard_normal((2, 2, 1)).astype(np.float32),  # K = 1
    }
    src = make_checkpoint(tmp_path / "src", tensors, config={"model_type": "x"})
    for group_size in (None, 16):
        out = tmp_path / f"out{group_size}"
        convert(src, out, group_size=group_size)
        for name in tensors:
            check_quantized(out, tensors, name, "e2m2", group_size)
        sd = load_state_dict(str(out), dtype=torch.float32)
        assert all(t.dtype == torch.float32 for t in sd.values())


def test_rel_error_stays_finite_for_large_magnitude_weights(tmp_path, rng):
    """rel_error is over the tensor in float64 (SPEC 4); squares of 1e20 overflow float32."""
    tensors = {"big.weight": (rng.standard_normal((8, 256)) * 1e20).astype(np.float32),
               "small.weight": (rng.standard_normal((8, 256)) * 1e-25).astype(np.float32)}
    src = make_checkpoint(tmp_path / "src", tensors)
    out = tmp_path / "out"
    convert(src, out)
    report = exmyconv.inspect(str(out))
    assert report["intact"], report["problems"]
    for name in tensors:
        check_quantized(out, tensors, name, "e2m2", None)


# --------------------------------------------------------------------------- sharding

def test_sharded_input_with_index(small_source, tmp_path):
    src, tensors, config = small_source
    names = list(tensors)
    sharded = make_checkpoint(tmp_path / "sharded", tensors, config=config,
                              shards=[names[:4], names[4:7], names[7:]])
    convert(src, tmp_path / "from_single")
    convert(sharded, tmp_path / "from_sharded")
    a, _ = read_dir(tmp_path / "from_single")
    b, _ = read_dir(tmp_path / "from_sharded")
    assert {k: v[:3] for k, v in a.items()} == {k: v[:3] for k, v in b.items()}
    assert json.loads((tmp_path / "from_sharded" / "config.json").read_text()) == \
        json.loads((tmp_path / "from_single" / "config.json").read_text())


def test_sharded_output_index(small_source, tmp_path, run_cli):
    src, tensors, _ = small_source
    out = tmp_path / "out"
    code, stdout, err = run_cli("quantize", src, out, "--group-size", "32", "--max-shard-size", "12KB")
    assert code == 0, err
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n >= 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored, metas = read_dir(out)
    assert index["weight_map"] == {name: v[3] for name, v in stored.items()}
    assert index["metadata"]["total_size"] == sum(len(v[2]) for v in stored.values())
    for fname in files:  # a shard over the limit holds a single source tensor
        in_file = [k for k, v in stored.items() if v[3] == fname]
        sources = {re.sub(r"_(packed|scale)$", "", k) for k in in_file}
        if len(sources) > 1:
            assert sum(len(stored[k][2]) for k in in_file) <= 12000
        for key in metas[fname]:
            if key.startswith("exmy:"):
                assert stored[key[5:] + "_packed"][3] == fname and stored[key[5:] + "_scale"][3] == fname
    for name in QUANTIZABLE:
        check_quantized(out, tensors, name, "e2m2", 32)
    single = tmp_path / "single"
    convert(src, single, group_size=32)
    a, b = load_state_dict(str(out)), load_state_dict(str(single))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert f"{n} shards" in stdout


def test_two_runs_are_byte_identical(small_source, tmp_path):
    src, _, _ = small_source
    for run in ("a", "b"):
        convert(src, tmp_path / run, group_size=64, max_shard_size=20000, clip_search=True)
    snap_a, snap_b = tree_snapshot(tmp_path / "a"), tree_snapshot(tmp_path / "b")
    assert len(snap_a) > 5 and snap_a == snap_b


# --------------------------------------------------------------------------- files and config

def test_side_files_and_config(small_source, tmp_path):
    src, tensors, config = small_source
    (src / "pytorch_model.bin").write_bytes(b"not copied")
    (src / ".hidden").write_text("x")
    out = tmp_path / "out"
    convert(src, out, format="e3m2", group_size=128)
    for rel in ("tokenizer.json", "generation_config.json", "sub/notes.txt", "1_Pooling/config.json"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    assert not (out / "pytorch_model.bin").exists()
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    # the guard that makes transformers without `import exmyconv` fail loudly (SPEC section 4)
    assert cfg.pop("attn_implementation") == GUARD_VALUE
    assert cfg == config, "the source config is kept as is, apart from the guard"
    assert set(qc) == {"quant_method", "format_version", "format", "group_size", "ignore", "tied", "exmyconv_version"}
    assert qc["quant_method"] == "exmy" and qc["format_version"] == "2.0"
    assert qc["format"] == "e3m2" and qc["group_size"] == 128
    assert qc["exmyconv_version"] == exmyconv.__version__
    assert sorted(qc["ignore"]) == sorted(EMBEDDINGS + ["model.position_ids"])
    out2 = tmp_path / "out2"
    convert(src, out2)
    qc2 = json.loads((out2 / "config.json").read_text())["quantization_config"]
    assert qc2["format"] == "e2m2" and qc2["group_size"] is None


def test_embeddings_kept_by_default_and_quantized_on_request(small_source, tmp_path):
    src, tensors, _ = small_source
    convert(src, tmp_path / "default")
    stored, _ = read_dir(tmp_path / "default")
    for name in EMBEDDINGS:
        arr = np.asarray(tensors[name])
        assert stored[name][:3] == ("F32", arr.shape, arr.tobytes())
    convert(src, tmp_path / "emb", quantize_embeddings=True)
    for name in EMBEDDINGS + QUANTIZABLE:
        check_quantized(tmp_path / "emb", tensors, name, "e2m2", None)
    qc = json.loads((tmp_path / "emb" / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["model.position_ids"]


def test_skip_regex(small_source, tmp_path, run_cli):
    src, tensors, _ = small_source
    out = tmp_path / "out"
    code, _, err = run_cli("quantize", src, out, "--skip", r"mlp\.down_", "--skip", "experts")
    assert code == 0, err
    stored, _ = read_dir(out)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.experts.weight"):
        arr = np.asarray(tensors[name])
        assert stored[name][2] == arr.tobytes() and stored[name][1] == arr.shape
    check_quantized(out, tensors, "model.layers.0.mlp.up_proj.weight", "e2m2", None)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.experts.weight" in qc["ignore"] and "model.layers.0.mlp.down_proj.weight" in qc["ignore"]


def test_one_dim_integer_and_odd_tensors_kept_verbatim(tmp_path, rng):
    tensors = {
        "norm.weight": rng.standard_normal(33).astype(np.float32),
        "bias.f16": rng.standard_normal(17).astype(np.float16),
        "bias.bf16": rng.standard_normal(9).astype(ml_dtypes.bfloat16),
        "scalar": np.array(3.5, dtype=np.float32),
        "ids": rng.integers(-5, 5, (4, 6)).astype(np.int64),
        "idx32": rng.integers(0, 100, (3, 3)).astype(np.int32),
        "mask": rng.integers(0, 2, (2, 5)).astype(bool),
        "bytes": rng.integers(0, 255, (3, 4)).astype(np.uint8),
        "f64.weight": rng.standard_normal(5).astype(np.float64),
        "empty.weight": np.zeros((0, 16), np.float32),
        "w.weight": rng.standard_normal((4, 16)).astype(np.float32),
        "zero.weight": np.zeros((3, 20), np.float32),
    }
    src = make_checkpoint(tmp_path / "src", tensors)
    out = tmp_path / "out"
    convert(src, out)
    stored, _ = read_dir(out)
    for name, arr in tensors.items():
        if name in ("w.weight", "zero.weight"):
            continue
        arr = np.asarray(arr)
        assert stored[name][1] == arr.shape and stored[name][2] == arr.tobytes(), name
    assert stored["bias.bf16"][0] == "BF16" and stored["ids"][0] == "I64" and stored["mask"][0] == "BOOL"
    check_quantized(out, tensors, "w.weight", "e2m2", None)
    zero = check_quantized(out, tensors, "zero.weight", "e2m2", None)
    assert not zero.any() and stored["zero.weight_scale"][0] == "F16"
    assert np.all(as_array(*stored["zero.weight_scale"][:3]) == np.float16(2.0**-14))
    sd = load_state_dict(str(out))
    assert sd["bias.bf16"].dtype == torch.bfloat16
    assert torch.equal(sd["bias.bf16"].float(), torch.from_numpy(tensors["bias.bf16"].astype(np.float32)))
    assert torch.equal(sd["ids"], torch.from_numpy(tensors["ids"]))
    assert sd["scalar"].shape == () and float(sd["scalar"]) == 3.5


# --------------------------------------------------------------------------- inspect

def test_inspect_converted_dir_single_file_and_plain(small_source, tmp_path, run_cli):
    src, tensors, _ = small_source
    out = tmp_path / "out"
    convert(src, out, group_size=32)
    code, text, err = run_cli("inspect", out)
    assert code == 0, err
    assert "exmy checkpoint" in text and "integrity: OK" in text and "Traceback" not in text + err
    for name in QUANTIZABLE + KEPT_ALWAYS:
        assert name in text
    code, js, _ = run_cli("inspect", out, "--json")
    assert code == 0
    report = json.loads(js)
    assert report["kind"] == "exmy" and report["intact"] and report["problems"] == []
    assert report["exmy_version"] == "2.0" and report["model_type"] == "llama"
    assert report["tensors"] == len(tensors) and report["quantized_tensors"] == len(QUANTIZABLE)
    rows = {r["name"]: r for r in report["tensor_table"]}
    assert set(rows) == set(tensors)
    for name in QUANTIZABLE:
        assert rows[name]["format"] == "e2m2" and rows[name]["group"] == 32
        assert rows[name]["shape"] == list(np.asarray(tensors[name]).shape)
        assert rows[name]["rel_error"] > 0
    assert report["quantized_params"] == sum(np.asarray(tensors[n]).size for n in QUANTIZABLE)
    stored, _ = read_dir(out)
    qbytes = sum(len(stored[n + sfx][2]) for n in QUANTIZABLE for sfx in ("_packed", "_scale"))
    assert report["bits_per_weight_quantized"] == pytest.approx(8 * qbytes / report["quantized_params"])
    assert report["file_bytes"] == (out / "model.safetensors").stat().st_size
    # single file
    code, js, _ = run_cli("inspect", out / "model.safetensors", "--json")
    assert code == 0 and json.loads(js)["quantized_tensors"] == len(QUANTIZABLE)
    # plain checkpoint
    code, js, _ = run_cli("inspect", src, "--json")
    plain = json.loads(js)
    assert code == 0 and plain["kind"] == "plain" and plain["quantized_tensors"] == 0 and plain["intact"]
    code, text, _ = run_cli("inspect", src)
    assert code == 0 and "plain checkpoint" in text


def rewrite(path, edit_meta=None, edit_tensor=None):
    """Rewrite a safetensors file through the independent writer, editing metadata/tensor bytes."""
    meta, ts, _ = read_safetensors(path)
    if edit_meta:
        edit_meta(meta)
    tensors = {}
    for name, (dtype, shape, data) in ts.items():
        if edit_tensor:
            dtype, shape, data = edit_tensor(name, dtype, shape, data)
        tensors[name] = Raw(dtype, shape, data)
    write_safetensors(path, tensors, meta)


TARGET = "model.layers.0.mlp.up_proj.weight"


def _wrong_shape(meta):
    d = json.loads(meta["exmy:" + TARGET])
    d["shape"] = [d["shape"][0], d["shape"][1] + 200]
    meta["exmy:" + TARGET] = json.dumps(d)


def _zero_scale(name, dtype, shape, data):
    if name == TARGET + "_scale":
        data = b"\0\0" + data[2:]
    return dtype, shape, data


def _nan_scale(name, dtype, shape, data):
    if name == TARGET + "_scale":
        data = data[:-2] + (b"\x00\x7e" if dtype == "F16" else b"\xc0\x7f")
    return dtype, shape, data


def _bad_version(meta):
    meta["exmy_version"] = "3.0"


@pytest.mark.parametrize("damage,edit_meta,edit_tensor,words", [
    ("packed shape", _wrong_shape, None, TARGET),
    ("zero scale", None, _zero_scale, "scale"),
    ("nan scale", None, _nan_scale, "scale"),
    ("version", _bad_version, None, "version"),
])
def test_inspect_detects_tampering(small_source, tmp_path, run_cli, damage, edit_meta, edit_tensor, words):
    src, _, _ = small_source
    out = tmp_path / "out"
    convert(src, out)
    rewrite(out / "model.safetensors", edit_meta, edit_tensor)
    code, text, err = run_cli("inspect", out)
    assert code != 0, damage
    assert "Traceback" not in text + err and words in text
    code, js, _ = run_cli("inspect", out, "--json")
    report = json.loads(js)
    assert code != 0 and not report["intact"] and report["problems"]
    with pytest.raises(ExmyError):
        load_state_dict(str(out))


def test_tied_lm_head_copy_is_stored_once(tmp_path, rng):
    from exmyconv.convert.pipeline import Options, convert
    emb = (rng.standard_normal((64, 96)) * 0.02).astype(np.float32)
    tensors = {"model.embed_tokens.weight": emb, "lm_head.weight": emb.copy(),
               "model.layers.0.mlp.up_proj.weight": (rng.standard_normal((32, 96)) * 0.02).astype(np.float32)}
    for tie, expect_tied in ((True, True), (False, False)):
        src = make_checkpoint(tmp_path / f"src{tie}", tensors, config={"tie_word_embeddings": tie})
        out = tmp_path / f"out{tie}"
        s = convert(str(src), str(out), Options(quantize_embeddings=True), progress=False)
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        sd = load_state_dict(str(out))
        if expect_tied:
            assert qc["tied"] == {"lm_head.weight": "model.embed_tokens.weight"} == s.tied
            assert "lm_head.weight" not in sd and "lm_head.weight_packed" not in sd
        else:
            assert qc["tied"] == {} and torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    # different values: never treated as tied
    tensors["lm_head.weight"] = emb * 2
    src = make_checkpoint(tmp_path / "src-untied", tensors, config={"tie_word_embeddings": True})
    s = convert(str(src), str(tmp_path / "out-untied"), Options(quantize_embeddings=True), progress=False)
    assert s.tied == {}


def test_package_dequantize_can_be_called_twice(small_source, tmp_path):
    """exmyconv.dequantize stays the API function (a module of that name once replaced it)."""
    out = tmp_path / "q"
    exmyconv.quantize(str(small_source[0]), str(out))
    for n in (1, 2):
        r = exmyconv.dequantize(str(out), str(tmp_path / f"fp{n}"))
        assert r["dequantized"] > 0 and callable(exmyconv.dequantize)
    assert read_safetensors(tmp_path / "fp1" / "model.safetensors") == read_safetensors(tmp_path / "fp2" / "model.safetensors")


def test_auto_summary_seconds_cover_the_whole_run(small_source, tmp_path, monkeypatch):
    """--format auto: the summary's seconds (and weights/s) include opening and planning, not just
    the search and the writing."""
    import time

    real_plan = pipeline.plan

    def slow_plan(*args, **kwargs):
        time.sleep(0.5)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(pipeline, "plan", slow_plan)
    s = exmyconv.quantize(str(small_source[0]), str(tmp_path / "auto"), format="auto", bits=9)
    assert s.seconds >= 0.5 + s.search_seconds


@pytest.mark.parametrize("name", [
    "encoder.layer.1.attention.output.dense.weight",
    "model.layers.10.block_sparse_moe.experts.7.w1.weight",
    "model.language_model.layers.27.self_attn.q_proj.weight",
    "transformer.h.3.mlp.an_extraordinarily_long_parameter_name_that_does_not_fit.weight",
    "a_single_part_that_is_far_longer_than_any_progress_bar_label_should_be",
    "model.layers.0.self_attn.q_proj.weight",
])
def test_progress_label_cuts_at_dots_and_keeps_the_end(name):
    """Progress-bar labels: at most 40 characters, the end of the name, whole parts only (never a part cut
    in two, as name[-40:] did: 'oder.layer.1...'), the layer number kept when it fits."""
    label = pipeline.progress_label(name)
    parts = name.split(".")
    assert len(label) <= 40
    if len(name) <= 40:
        assert label == name
        return
    assert label.startswith("…") or " … " in label  # says that something was left out
    if len(parts) == 1:
        assert label == "…" + name[-39:]
        return
    pieces = [p for p in label.replace(" … ", ".").lstrip("…").split(".") if p]
    assert all(p in parts for p in pieces), label  # whole parts only
    assert label.endswith(parts[-1]) or label == "…" + name[-39:]
    number = next((p for p in parts[1:] if p.isdigit()), None)
    if number is not None and len(parts[-1]) < 20:
        assert number in pieces, label


def test_one_kept_weight_is_singular(tmp_path, rng, run_cli):
    src = make_checkpoint(tmp_path / "src", {"w.weight": rng.standard_normal((8, 128)).astype(np.float32),
                                             "emb.embed_tokens.weight": rng.standard_normal((8, 128)).astype(np.float32)})
    code, out, err = run_cli("quantize", src, tmp_path / "out", "--no-verify")
    assert code == 0, err
    assert "warning: 1 weight left unquantized:" in err and "1 weights" not in err
    assert "(1 shard)" in out
    code, out, err = run_cli("verify", tmp_path / "out", "--no-gpu")
    assert code == 0 and out.startswith("verified 1 quantized tensor\n"), out


@pytest.mark.parametrize("fmt_name, group, codes", [("e2m2", None, 5.0), ("e2m2s4", None, 4.25), ("e3m2", 64, 6.0)])
def test_inspect_nominal_and_effective_bits(tmp_path, rng, run_cli, fmt_name, group, codes):
    """K = 576 (SmolLM2's hidden size) needs no padding in layout 2.0, K = 250 is padded to 256: inspect
    shows the effective bits (as stored) beside the nominal ones (codes + scales) and where the
    difference goes."""
    src = make_checkpoint(tmp_path / "src", {"a.weight": rng.standard_normal((12, 576)).astype(np.float32),
                                             "c.weight": rng.standard_normal((2, 250)).astype(np.float32),
                                             "b.weight": rng.standard_normal((4, 3, 256)).astype(np.float32)})
    out = tmp_path / "out"
    convert(src, out, format=fmt_name, group_size=group)
    code, js, err = run_cli("inspect", out, "--json")
    assert code == 0, err
    report = json.loads(js)
    params = {"a.weight": 12 * 576, "b.weight": 12 * 256, "c.weight": 2 * 250}
    groups = {"a.weight": 12 * (-(-576 // group) if group else 1), "b.weight": 12 * (-(-256 // group) if group else 1),
              "c.weight": 2 * (-(-250 // group) if group else 1)}
    share = 4 if fmt_name.endswith("s4") else 1
    own = 5 - 1 if share > 1 else {"e2m2": 5, "e3m2": 6}[fmt_name]
    # bytes by SPEC section 3: rows padded to 576 / 256 / 256, the shared plane to 4 bytes per row
    def row(kp):
        return kp * own // 8 + (4 * -(-kp // share // 32) if share > 1 else 0)
    stored = 12 * row(576) + 2 * groups["a.weight"] + 12 * row(256) + 2 * groups["b.weight"] \
        + 2 * row(256) + 2 * groups["c.weight"]
    n = sum(params.values())
    assert report["bits_per_weight_quantized"] == pytest.approx(8 * stored / n, rel=1e-12)
    scales = 16 * sum(groups.values()) / n
    assert report["bits_per_weight_nominal"] == pytest.approx(codes + scales, rel=1e-12)
    b = report["bits_breakdown"]
    assert b["codes"] == pytest.approx(codes) and b["scales"] == pytest.approx(scales)
    assert b["codes"] + b["scales"] + b["padding"] == pytest.approx(report["bits_per_weight_quantized"], rel=1e-12)
    assert 0 < b["padding"] < 0.05  # 250 -> 256 on a few rows (576 -> 640 in layout 1.x)
    rows = {r["name"]: r for r in report["tensor_table"]}
    assert rows["b.weight"]["bits_nominal"] == pytest.approx(rows["b.weight"]["bits"]) or share > 1
    assert 0 <= rows["a.weight"]["bits"] - rows["a.weight"]["bits_nominal"] < 0.05  # issue 20's target at K = 576
    assert rows["c.weight"]["bits"] - rows["c.weight"]["bits_nominal"] > 0.1
    code, text, _ = run_cli("inspect", out)
    assert (f"{report['bits_per_weight_quantized']:.3f} effective (as stored), "
            f"{report['bits_per_weight_nominal']:.3f} nominal") in text
    assert f"codes {codes:.3f} + scales {scales:.3f} + padding {b['padding']:.3f} (rows padded to a multiple of 32" in text


def test_moe_routers_stay_in_source_precision_unless_asked(tmp_path, rng, run_cli):
    """Routers (Qwen/DeepSeek mlp.gate, Mixtral block_sparse_moe.gate, gpt-oss mlp.router, Qwen2-MoE
    shared_expert_gate) are kept as stored by default, with the reason named; a dense MLP's gate_proj
    and the experts are quantized; --quantize-routers quantizes the routers too."""
    h, e = 64, 4
    routers = ["model.layers.0.mlp.gate.weight", "model.layers.1.block_sparse_moe.gate.weight",
               "model.layers.2.mlp.router.weight", "model.layers.3.mlp.shared_expert_gate.weight"]
    shapes = {routers[0]: (e, h), routers[1]: (e, h), routers[2]: (e, h), routers[3]: (1, h),
              "model.layers.0.mlp.gate_proj.weight": (96, h), "model.layers.0.mlp.experts.gate_up_proj": (e, 2 * 32, h),
              "model.layers.1.block_sparse_moe.experts.0.w1.weight": (32, h)}
    tensors = {name: (rng.standard_normal(shape) * 0.05).astype(ml_dtypes.bfloat16) for name, shape in shapes.items()}
    src = make_checkpoint(tmp_path / "src", tensors, config={"model_type": "qwen3_moe"})
    code, out, err = run_cli("quantize", src, tmp_path / "out", "--no-verify")
    assert code == 0, err
    for name in routers:
        assert re.search(re.escape(name) + r"\s+MoE router \(use --quantize-routers\)", err), err
    stored = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        stored.update(read_safetensors(f)[1])
    with Checkpoint(str(tmp_path / "out")) as ckpt:
        assert set(ckpt.records) == set(shapes) - set(routers)
    for name in routers:  # kept byte for byte, in the source dtype
        dtype, shape, raw = stored[name]
        assert (dtype, tuple(shape), raw) == ("BF16", shapes[name], tensors[name].tobytes())
    code, out, err = run_cli("quantize", src, tmp_path / "all", "--no-verify", "--quantize-routers")
    assert code == 0, err
    with Checkpoint(str(tmp_path / "all")) as ckpt:
        assert set(ckpt.records) == set(shapes)


@pytest.mark.parametrize("scales8", [False, True])
def test_stack_scale_choice_needs_only_each_members_extremes(rng, scales8):
    """stack_scales keeps two numbers per member (smallest non-zero and largest group absmax): the choice
    made from them equals the choice made from every group, on amax spanning fp16's limits (zeros, groups
    whose fp16 scale would be subnormal, groups near the fp16 maximum)."""
    from exmyconv.format.layout import TensorRecord

    record = TensorRecord("m.experts.0.w1.weight", formats.get_format("e2m2"), (8, 64), "F32", 32,
                          scale_exp=0 if scales8 else None)
    seen = set()
    for _ in range(200):
        members = [np.abs(rng.standard_normal(rng.integers(1, 40))).astype(np.float32)
                   * np.float32(10.0 ** rng.uniform(-8, 6)) for _ in range(rng.integers(1, 5))]
        for m in members:
            m[rng.random(m.size) < 0.2] = 0
        full = pipeline.scale_choice(np.concatenate(members), record)
        assert pipeline.scale_choice(np.concatenate([pipeline._extremes(m) for m in members]), record) == full
        seen.add(full)
    assert len(seen) > 2 if scales8 else seen == {("F16", None), ("BF16", None)}  # (every outcome was met)
