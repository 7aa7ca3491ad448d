"""8-bit scales (layout 2.0, `quantize --scales e4m3`): e4m3 group scales times a power of two per tensor.

Oracles: ml_dtypes' float8_e4m3fn for the scale values and their rounding (independent of exmyconv's
e4m3), the spec-only decoder (tests/spec_decoder.py) for reading, and exmyconv's 16-bit path for the
codes given the same scales.
"""
from __future__ import annotations

import json
import os
import sys

import ml_dtypes
import numpy as np
import pytest

from conftest import Raw, make_checkpoint, read_safetensors, write_safetensors
from exmyconv.convert.pipeline import Options, convert
from exmyconv.errors import ExmyError
from exmyconv.format import quant
from exmyconv.format.exmy import get_format
from exmyconv.io.checkpoint import Checkpoint, open_checkpoint
from exmyconv.torch.state_dict import load_state_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_decoder as sd  # noqa: E402

E4M3 = ml_dtypes.float8_e4m3fn


def oracle(x: np.ndarray, fmt, g: int):
    """SPEC section 2 (informative part) with ml_dtypes: t, the e4m3 scales, their values."""
    rows, k = x.shape
    ng = -(-k // g)
    pad = np.zeros((rows, ng * g), np.float32)
    pad[:, :k] = np.abs(x)
    amax = pad.reshape(rows, ng, g).max(-1)
    top = amax.max() / fmt.max
    t = 0
    if top > 0:
        t = int(np.ceil(np.log2(top / 448.0)))
        while top / 2.0 ** t > 448:
            t += 1
    d = (amax / np.float32(fmt.max)).astype(np.float32) * np.float32(2.0 ** -t)
    c = np.clip(d, 2.0 ** -9, 448).astype(E4M3)  # round to nearest even, as ml_dtypes converts
    return t, c.astype(np.float32) * np.float32(2.0 ** t), c.view(np.uint8)


@pytest.mark.parametrize("name,g", [("e2m1", 32), ("e2m2", 64), ("e2m2s4", 32), ("e3m2", 100), ("e2m3", 576)])
def test_scales_match_ml_dtypes_and_codes_match_the_16_bit_path(rng, name, g):
    fmt = get_format(name)
    x = (rng.standard_normal((37, 576)) * rng.uniform(1e-3, 3, (37, 1))).astype(np.float32)
    x[3] = 0.0  # an all-zero row: the smallest scale, codes 0
    x[5, :64] *= 1e-4  # tiny groups
    q = quant.quantize(x, fmt, g, scales8=True)
    t, want, _ = oracle(x, fmt, min(g, 576))
    assert q.scale_dtype == "F8_E4M3" and q.scale_exp == t
    assert np.array_equal(q.scales, want)
    # the codes are those of the same scales through the 16-bit path's encoder (x / s, exact division)
    codes = quant.encode_groups(x, q.scales, fmt, q.group_size)
    got = quant.dequantize_codes(codes, q.scales, fmt, q.group_size)
    deq = q.dequantize()
    assert np.array_equal(deq, got) and np.isfinite(deq).all() and not deq[3].any()
    err8 = np.linalg.norm(deq - x) / np.linalg.norm(x)
    err16 = np.linalg.norm(quant.quantize(x, fmt, g).dequantize() - x) / np.linalg.norm(x)
    assert err8 < 1.05 * err16, (err8, err16)  # a 4-bit scale significand costs little


def _convert(tmp_path, rng, fmt="e2m1", g=32, **extra):
    src = make_checkpoint(tmp_path / "src", {
        "model.layers.0.mlp.up_proj.weight": (rng.standard_normal((48, 576)) * 0.02).astype(np.float32),
        "model.layers.0.mlp.down_proj.weight": (rng.standard_normal((24, 160)) * 0.3).astype(np.float32),
        "model.norm.weight": np.ones(8, np.float32)})
    out = tmp_path / "out"
    convert(str(src), str(out), Options(format=fmt, group_size=g, scales="e4m3", **extra), progress=False)
    return src, out


def test_pipeline_writes_8_bit_scales_every_reader_agrees(tmp_path, rng, run_cli):
    src, out = _convert(tmp_path, rng)
    meta, tensors, _ = read_safetensors(out / "model.safetensors")
    spec = sd.read_checkpoint(str(out))
    ref = load_state_dict(str(out))
    with Checkpoint(str(out)) as ckpt:
        for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
            record = json.loads(meta["exmy:" + name])
            assert tensors[name + "_scale"][0] == "F8_E4M3" and isinstance(record["scale_exp"], int)
            x = np.frombuffer(read_safetensors(src / "model.safetensors")[1][name][2], np.float32).reshape(
                record["shape"])
            t, want, stored = oracle(x, get_format("e2m1"), 32)
            assert record["scale_exp"] == t
            assert np.frombuffer(tensors[name + "_scale"][2], np.uint8).tolist() == stored.ravel().tolist()
            exact = spec.quantized[name].dequantize()
            assert np.array_equal(ckpt.dequantize(name), exact)
            assert np.array_equal(ref[name].numpy(), exact)
    code, js, err = run_cli("inspect", out, "--json")
    assert code == 0, err
    b = json.loads(js)["bits_breakdown"]
    assert b["codes"] == pytest.approx(4.0) and b["scales"] == pytest.approx(8 / 32) and b["padding"] == 0
    code, text, err = run_cli("verify", out, "--no-gpu")
    assert code == 0, err


def _damage(out, edit):
    path = out / "model.safetensors"
    meta, ts, _ = read_safetensors(path)
    tensors = {n: Raw(d, s, data) for n, (d, s, data) in ts.items()}
    edit(meta, tensors)
    write_safetensors(path, tensors, meta)


NAME = "model.layers.0.mlp.up_proj.weight"


def _byte(value):
    def edit(meta, tensors):
        raw = tensors[NAME + "_scale"]
        tensors[NAME + "_scale"] = Raw(raw.dtype, raw.shape, bytes([value]) + raw.data[1:])
    return edit


def _record(**change):
    def edit(meta, tensors):
        d = json.loads(meta["exmy:" + NAME])
        for key, value in change.items():
            if value is None:
                d.pop(key, None)
            else:
                d[key] = value
        meta["exmy:" + NAME] = json.dumps(d)
    return edit


def _as_f16(meta, tensors):  # 16-bit scale dtype while the record says 8-bit
    raw = tensors[NAME + "_scale"]
    tensors[NAME + "_scale"] = Raw("F16", raw.shape, np.full(raw.shape, 0.01, np.float16).tobytes())


@pytest.mark.parametrize("edit,words", [
    (_byte(0x00), "scale"), (_byte(0x7F), "scale"), (_byte(0x80), "scale"), (_byte(0xFE), "scale"),
    (_record(scale_exp=None), "F16/BF16"), (_record(scale_exp=101), "scale_exp"), (_record(scale_exp=1.5), "scale_exp"),
    (_record(scale_exp=True), "scale_exp"), (_as_f16, "F8_E4M3"),
    (lambda meta, tensors: meta.update(exmy_version="1.2"), "2.0"),
])
def test_bad_8_bit_scales_are_refused_by_both_readers(tmp_path, rng, edit, words):
    _, out = _convert(tmp_path, rng)
    _damage(out, edit)
    with pytest.raises(ExmyError, match=words):
        with open_checkpoint(str(out)) as ckpt:
            ckpt.check()
    with pytest.raises(ValueError):
        sd.read_checkpoint(str(out))


def test_auto_counts_one_byte_per_scale(tmp_path, rng):
    """--format auto --scales e4m3: the search's sizes are the written bytes, and the budget holds."""
    _, out = _convert(tmp_path, rng, fmt="auto", g=None, bits=4.4, candidates="e2m1-g32,e2m1-g64,e2m2s4-g32,e2m2")
    with Checkpoint(str(out)) as ckpt:
        stored = sum(f.tensors[r.packed_name].nbytes + f.tensors[r.scale_name].nbytes
                     for r, f in ckpt.records.values())
        numel = sum(r.numel for r, _ in ckpt.records.values())
        assert all(r.scale_exp is not None for r, _ in ckpt.records.values())
    report = json.loads((out / "exmy_search.json").read_text())
    assert 8 * stored / numel <= 4.4 + 1e-9
    assert report["bits"] == pytest.approx(8 * stored / numel) if "bits" in report else True


def test_scales_option_is_checked():
    with pytest.raises(ExmyError, match="--scales"):
        Options(format="e2m2", scales="e5m2")


def test_transformers_keeps_8_bit_scales_packed(tmp_path):
    """from_pretrained of an 8-bit-scale checkpoint: every linear layer an ExmyLinear holding the stored
    float8 scales, decoding exactly to exmyconv's dequantized weights; logits equal those of the
    dequantized folder loaded as a plain model (CPU: the same F.linear on the same weights)."""
    transformers = pytest.importorskip("transformers")
    import torch

    import exmyconv

    cfg = transformers.LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src", safe_serialization=True)
    exmyconv.quantize(str(tmp_path / "src"), str(tmp_path / "q"), format="e2m2s4", group_size=32, scales="e4m3")
    from exmyconv.torch.linear import ExmyLinear

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    ref = load_state_dict(str(tmp_path / "q"), dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ExmyLinear)}
    assert len(layers) == 7
    stored = read_safetensors(tmp_path / "q" / "model.safetensors")[1]
    for path, layer in layers.items():
        assert layer.weight_scale.dtype == torch.float8_e4m3fn and isinstance(layer.scale_exp, int)
        raw = stored[path + ".weight_scale"][2]
        assert layer.weight_scale.view(torch.uint8).flatten().tolist() == list(raw)  # the stored bytes
        assert torch.equal(layer.dequantize_weight(torch.float32), ref[path + ".weight"]), path
    exmyconv.dequantize(str(tmp_path / "q"), str(tmp_path / "plain"), dtype="float32")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        got, want = model(ids).logits, plain(ids).logits
    assert not torch.isnan(got).any() and torch.equal(got, want)
