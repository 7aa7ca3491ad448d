"""exmyconv bench --e2e --generate: arguments, the no-GPU message, and the folders it measures (CPU).

The timing itself needs a GPU (scripts/gpu-check runs it; figures in docs/benchmarks.md).
"""
from __future__ import annotations

import json

import pytest

from exmyconv.bench import generate as g
from exmyconv.cuda import device
from exmyconv.errors import ExmyError
from exmyconv.io.checkpoint import open_checkpoint

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
        "max_position_embeddings": 128, "tie_word_embeddings": False}


def test_variants_put_bf16_first_once():
    assert g.parse_variants(None) == ["bf16", "e2m2"]
    assert g.parse_variants("E2M2S4, bf16,e2m2,e2m2s4") == ["bf16", "e2m2s4", "e2m2"]
    with pytest.raises(ExmyError):
        g.parse_variants("e9m9")


def test_generate_needs_e2e(run_cli):
    code, out, err = run_cli("bench", "--generate")
    assert code == 1 and "--generate goes with --e2e" in err and "Traceback" not in err


@pytest.mark.skipif(not device.bench_reason(), reason="a GPU is present: the message is for machines without one")
def test_no_gpu_says_why(run_cli, tmp_path):
    code, out, err = run_cli("bench", "--e2e", "llama3-8b", "--generate", "--layers", "1")
    assert code == 2 and err.startswith("exmyconv bench --e2e --generate:") and err.count("\n") == 1


def test_bad_arguments_are_one_line(run_cli):
    for args in (("--tokens", "0"), ("--layers", "0"), ("--batches", "17"), ("--formats", "e2m2,zz")):
        code, out, err = run_cli("bench", "--e2e", "llama3-8b", "--generate", *args)
        assert code == 1 and err.startswith("error:") and "Traceback" not in err, args


def test_prepare_builds_the_source_and_converts_each_variant(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(TINY))
    work = tmp_path / "work"
    work.mkdir()
    folders = g.prepare(str(tmp_path / "cfg"), ["bf16", "e2m2", "e2m2s4"], 2, work, log=lambda m: None)
    assert list(folders) == ["bf16", "e2m2", "e2m2s4"]
    config = json.loads((folders["bf16"] / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    for name in ("e2m2", "e2m2s4"):
        with open_checkpoint(str(folders[name])) as ckpt:
            formats = {r[0].fmt.name for r in ckpt.records.values()}
        assert formats == {name}
    # a converted folder measures against its own bf16 dequantization
    again = g.prepare(str(folders["e2m2"]), ["bf16"], None, tmp_path, log=lambda m: None)
    assert again == {"bf16": tmp_path / "bf16", "e2m2": folders["e2m2"]}
    with open_checkpoint(str(again["bf16"])) as ckpt:
        assert not ckpt.records and ckpt.plain


def test_not_a_model_is_one_line(tmp_path):
    with pytest.raises(ExmyError, match="not a preset"):
        g.prepare(str(tmp_path / "nothing"), ["bf16"], None, tmp_path, log=lambda m: None)


def test_compare_tokens_tells_ties_from_mismatches():
    """Row 0 equal; row 1 differs where the two paths' logits swap two near-equal candidates (a tie);
    row 2 differs although the paths' logits agree (a mismatch: the fast path chose another token)."""
    import torch
    from types import SimpleNamespace

    prompt, vocab = 2, 6
    ref = torch.tensor([[5, 0, 1, 2, 3]] * 3)
    fast = torch.tensor([[5, 0, 1, 2, 3], [5, 0, 1, 4, 0], [5, 0, 1, 4, 0]])
    ref_logits = [torch.zeros(3, vocab) for _ in range(3)]
    fast_logits = [torch.zeros(3, vocab) for _ in range(3)]
    ref_logits[1][:, 2], ref_logits[1][:, 4] = 1.0, 0.99
    fast_logits[1][0, 2] = fast_logits[1][2, 2] = 1.0
    fast_logits[1][0, 4] = fast_logits[1][2, 4] = 0.99
    fast_logits[1][1, 2], fast_logits[1][1, 4] = 0.99, 1.0
    result = g.compare_tokens(SimpleNamespace(sequences=fast, logits=fast_logits),
                              SimpleNamespace(sequences=ref, logits=ref_logits), prompt)
    assert (result["equal"], result["ties"], result["mismatches"]) == (1, 1, 1)
    assert [d["row"] for d in result["first_difference"]] == [1, 2]
    assert all(d["step"] == 1 for d in result["first_difference"])


def test_moe_preset_builds_a_qwen3_moe_config():
    from exmyconv.bench import e2e

    config = g._preset_config("qwen3-moe", 2)
    assert type(config).__name__ == "Qwen3MoeConfig"
    assert (config.num_hidden_layers, config.hidden_size, config.num_experts, config.num_experts_per_tok,
            config.moe_intermediate_size) == (2, 2048, 128, 8, 768)
    assert g._preset_config("qwen3-moe", None).num_hidden_layers == 48
    with pytest.raises(ExmyError, match="--generate. only"):  # the e2e engine builds Llama-shaped decoders
        e2e.build_config("qwen3-moe")


def test_measure_times_the_variants_in_turns(tmp_path, monkeypatch):
    """measure() on the CPU, eager mode: each round times every variant once, in turn; bf16's ratio is 1;
    the ExMy variant's tokens are compared with its exact path (on the CPU both are dequantize + F.linear:
    every sequence equal)."""
    import torch
    import transformers

    from exmyconv.integrations.transformers import register
    from exmyconv.torch.linear import ExmyLinear

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(TINY))
    work = tmp_path / "work"
    work.mkdir()
    folders = g.prepare(str(tmp_path / "cfg"), ["bf16", "e2m2"], 1, work, log=lambda m: None)
    register()
    models = {}
    for name, folder in folders.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
        layers = sum(isinstance(m, ExmyLinear) for m in model.modules())
        models[name] = (model, {"variant": name, "exmy_layers": layers, "exmy_experts": 0})
    assert models["e2m2"][1]["exmy_layers"] > 0
    calls = []
    plain = g._generate

    def recorded(model, ids, tokens, compiled, logits=False):
        calls.append((next(n for n, (m, _) in models.items() if m is model), logits))
        return plain(model, ids, tokens, compiled, logits)

    monkeypatch.setattr(g, "_generate", recorded)
    rows = g.measure(models, [1, 2], tokens=3, runs=2, vocab=TINY["vocab_size"], log=lambda m: None,
                     modes=("eager",), device="cpu")
    assert [(r["batch"], r["variant"]) for r in rows] == [(1, "bf16"), (1, "e2m2"), (2, "bf16"), (2, "e2m2")]
    timed = [name for name, logits in calls if not logits]
    # per batch: one warm-up each, then two rounds of (bf16, e2m2)
    assert timed == ["bf16", "e2m2", "bf16", "e2m2", "bf16", "e2m2"] * 2
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["range_s"][0] <= r["seconds"] <= r["range_s"][1]
        if r["variant"] == "bf16":
            assert r["vs_bf16"] == 1.0 and "tokens" not in r
        else:
            assert r["vs_bf16"] > 0 and r["tokens"]["equal"] == r["batch"] and not r["tokens"]["mismatches"]
    table = g.table({"variants": [dict(models[n][1], memory_gb=0.0, rows=[r for r in rows if r["variant"] == n])
                                  for n in models]})
    assert table.count("\n") == 1 + len(rows) and "| e2m2 | 0.00 GB | eager | 2 |" in table


def test_variants_that_do_not_fit_together_load_one_at_a_time(tmp_path):
    folders = {}
    for name, size in (("bf16", 1000), ("e2m2", 400)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * size)
        (tmp_path / name / "config.json").write_text("{}")  # not weights: not counted
        folders[name] = tmp_path / name
    need = 1400 * g.HEADROOM
    assert g.load_groups(folders, int(need) + 1) == [folders]
    assert g.load_groups(folders, int(need) - 1) == [{"bf16": folders["bf16"]}, {"e2m2": folders["e2m2"]}]
    rows = [{"variant": "bf16", "mode": "eager", "batch": 1, "seconds": 2.0, "vs_bf16": 1.0},
            {"variant": "bf16", "mode": "compiled", "batch": 1, "seconds": 1.0, "vs_bf16": 1.0},
            {"variant": "e2m2", "mode": "eager", "batch": 1, "seconds": 1.6},
            {"variant": "e2m2", "mode": "compiled", "batch": 1, "seconds": 0.8, "vs_bf16": 1.3}]
    out = g.with_ratios(rows)
    assert [r["vs_bf16"] for r in out] == [1.0, 1.0, 1.25, 1.3]  # measured in turns: kept as it is


@pytest.mark.parametrize("free,in_turns", [(10 ** 12, True), (1, False)])
def test_run_measures_in_turns_or_alone(tmp_path, monkeypatch, free, in_turns):
    """run()'s bookkeeping (the timing itself needs a GPU): one group in turns when the variants fit,
    else one per variant; every variant's facts and rows in the result, speedups filled in."""
    import torch

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(TINY))
    groups = []

    def fake_load_all(group, log=print):
        groups.append(list(group))
        return {name: (None, {"variant": name, "memory_gb": 0.0}) for name in group}

    def fake_measure(models, batches, tokens, runs, vocab, log=print):
        return [{"variant": name, "mode": "eager", "batch": b, "seconds": 1.0 if name == "bf16" else 0.5,
                 **({"vs_bf16": 1.0} if name == "bf16" else {})} for name in models for b in batches]

    monkeypatch.setattr(g, "load_all", fake_load_all)
    monkeypatch.setattr(g, "measure", fake_measure)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (free, free))
    monkeypatch.setattr(device, "device_info", lambda: {"name": "stub"})
    result = g.run(str(tmp_path / "cfg"), ["bf16", "e2m2"], [1, 4], layers=1, tokens=2, work=str(tmp_path),
                   log=lambda m: None)
    assert groups == ([["bf16", "e2m2"]] if in_turns else [["bf16"], ["e2m2"]])
    assert result["in_turns"] is in_turns and [v["variant"] for v in result["variants"]] == ["bf16", "e2m2"]
    e2m2 = result["variants"][1]["rows"]
    assert [r["batch"] for r in e2m2] == [1, 4] and all(r["vs_bf16"] == 2.0 for r in e2m2)
