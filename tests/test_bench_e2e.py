"""exmyconv bench --e2e: argument handling, configs, the no-GPU message (CPU); decoding speed (GPU)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from exmyconv.bench import e2e as e
from exmyconv.cuda import device
from exmyconv.cli.bench import bench
from exmyconv.errors import ExmyError

TINY = e.DecoderConfig(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=50, rope_theta=10000.0)


def test_preset_is_llama3_8b_and_layers_shrink():
    cfg = e.build_config("llama3-8b")
    assert (cfg.hidden, cfg.intermediate, cfg.layers, cfg.heads, cfg.kv_heads, cfg.vocab) == \
        (4096, 14336, 32, 32, 8, 128256)
    assert cfg.linear_shapes() == [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
    assert e.build_config("llama3-8b", layers=2).layers == 2
    with pytest.raises(ExmyError, match="layers"):
        e.build_config("llama3-8b", layers=0)


def test_config_from_transformers_json(tmp_path):
    raw = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 50, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    for spec in (tmp_path, tmp_path / "config.json"):
        cfg = e.build_config(str(spec))
        assert (cfg.hidden, cfg.intermediate, cfg.layers, cfg.heads, cfg.kv_heads, cfg.vocab, cfg.hd) == \
            (64, 96, 3, 4, 2, 50, 16)
    assert e.build_config(str(tmp_path), layers=1).layers == 1
    (tmp_path / "config.json").write_text(json.dumps({**raw, "num_key_value_heads": 3}))
    with pytest.raises(ExmyError, match="multiple"):
        e.build_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ExmyError, match="hidden_size"):
        e.build_config(str(tmp_path))
    with pytest.raises(ExmyError, match="not a preset"):
        e.build_config(str(tmp_path / "missing"))


def test_formats_and_batches():
    assert e.parse_formats(None) == ["fp16", "e2m2", "e2m1", "e4m3"]
    assert e.parse_formats("e2m2, fp16,e2m2") == ["fp16", "e2m2"]
    with pytest.raises(ExmyError):
        e.parse_formats("e9m9x")
    assert e.parse_formats("e2m2s4") == ["fp16", "e2m2s4"]
    assert e.parse_batches(None) == [1, 4]
    assert e.parse_batches("1,2,16") == [1, 2, 16]
    for bad in ("0", "17", "a"):
        with pytest.raises(ExmyError):
            e.parse_batches(bad)


def test_cli_bad_arguments_exit_1():
    runner = CliRunner()
    for args in (["--e2e", "no-such-model"], ["--e2e", "llama3-8b", "--layers", "0"],
                 ["--e2e", "llama3-8b", "--batches", "32"], ["--e2e", "llama3-8b", "--formats", "e9m9x"]):
        res = runner.invoke(bench, args)
        assert res.exit_code == 1, (args, res.output)
        assert "error:" in res.output


@pytest.mark.skipif(device.bench_reason() == "", reason="a GPU is present")
def test_cli_without_gpu_one_line_exit_2():
    res = CliRunner().invoke(bench, ["--e2e", "llama3-8b", "--layers", "1"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("exmyconv bench --e2e: needs")


def test_table_speedups():
    result = {"results": [
        {"format": "fp16", "batch": 1, "graph_tok_s": 100.0, "eager_tok_s": 50.0},
        {"format": "e2m2", "batch": 1, "graph_tok_s": 200.0, "eager_tok_s": 25.0},
        {"format": "e2m2", "batch": 4, "eager_tok_s": 80.0, "graph_error": "x"}]}
    text = e.table(result)
    assert "| 1 | e2m2 | 200.0 | 2.00× | 25.0 | 0.50× | 5.00 |" in text
    assert "| 4 | e2m2 | — | — | 80.0 | — | — |" in text


def _reference_logits(model: e.Decoder, tokens: list[torch.Tensor]) -> torch.Tensor:
    """Float64 full-sequence causal forward of the same weights (independent of the step code)."""
    cfg = model.cfg
    hd, g = cfg.hd, cfg.heads // cfg.kv_heads
    ids = torch.stack(tokens, dim=1)  # [B, T]
    b, t = ids.shape
    f = lambda x: x.double()  # noqa: E731

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_eps) * f(w)

    def rope(x, pos):
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.outer(pos.double(), inv)
        ang = torch.cat([ang, ang], -1)
        half = hd // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * ang.cos() + rot * ang.sin()

    h = f(model.embed)[ids]
    pos = torch.arange(t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    nq, nkv = cfg.heads * hd, cfg.kv_heads * hd
    for layer in model.layers:
        wqkv, wo, wgu, wd = (f(lin.w) for lin in layer["lin"])
        qkv = rms(h, layer["ln1"]) @ wqkv.T
        q = rope(qkv[..., :nq].view(b, t, cfg.heads, hd).transpose(1, 2), pos)
        k = rope(qkv[..., nq:nq + nkv].view(b, t, cfg.kv_heads, hd).transpose(1, 2), pos)
        v = qkv[..., nq + nkv:].view(b, t, cfg.kv_heads, hd).transpose(1, 2)
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        a = torch.softmax(s.masked_fill(~causal, -math.inf), -1) @ v
        h = h + a.transpose(1, 2).reshape(b, t, nq) @ wo.T
        gu = rms(h, layer["ln2"]) @ wgu.T
        h = h + (torch.nn.functional.silu(gu[..., :cfg.intermediate]) * gu[..., cfg.intermediate:]) @ wd.T
    return rms(h, model.norm) @ f(model.lm_head).T  # [B, T, V]


def test_decoder_step_matches_reference_on_cpu():
    """The graph-ready step (static KV cache, fused q/k/v and gate/up, GQA as query rows) is a Llama."""
    model = e.Decoder(TINY, "fp16", batch=2, max_len=6, seed=3, device="cpu")
    model.reset(torch.tensor([7, 11]))
    tokens, logits = [], []
    for _ in range(6):
        tokens.append(model.tok.clone())
        model.step()
        logits.append(model.logits.double())
        assert torch.equal(model.tok, model.logits.argmax(-1))
    assert int(model.pos) == 6
    ref = _reference_logits(model, tokens)
    got = torch.stack(logits, dim=1)
    err = (got - ref).norm() / ref.norm()
    assert err < 1e-2, float(err)


@pytest.mark.gpu
@pytest.mark.skipif(device.bench_reason() != "", reason="needs a CUDA GPU with CuPy")
def test_e2e_tiny_on_gpu():
    cfg = e.build_config("llama3-8b", layers=1)
    result = e.run(cfg, e.parse_formats("e2m2"), [1, 4], tokens=8, runs=2, log=lambda m: None)
    assert [r["format"] for r in result["results"]] == ["fp16", "e2m2", "fp16", "e2m2"]
    for r in result["results"]:
        assert "graph_error" not in r and r["graph_matches_eager"]
        assert r["graph_tok_s"] > 0 and r["eager_tok_s"] > 0
