"""transformers integration (exmyconv.integrations.transformers): converted checkpoints load with from_pretrained.

Reference everywhere: the plain model, i.e. the same converted checkpoint dequantized by
``exmyconv.load_state_dict(out_dir, dtype=...)`` and loaded by transformers without any
quantizer (a plain safetensors folder). Small random-weight models are built offline from real
transformers configs. Logits are compared bitwise: ExmyLinear decodes exactly the weights the
plain model holds and then runs the same ``F.linear``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import safetensors.torch  # noqa: E402
from packaging.version import Version  # noqa: E402
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GptOssConfig,  # noqa: E402
                          HrmTextConfig, LlamaConfig, Qwen2Config, Qwen3Config, T5Config)

import exmyconv  # noqa: E402
from exmyconv.integrations import transformers as hf  # noqa: E402
from exmyconv.io.checkpoint import Checkpoint  # noqa: E402
from exmyconv.integrations.transformers_impl import ExmyConfig  # noqa: E402
from exmyconv.torch.codec import dequantize  # noqa: E402
from exmyconv.torch.embedding import ExmyEmbedding  # noqa: E402
from exmyconv.torch.linear import ExmyLinear  # noqa: E402
from exmyconv.io.source import example_dir  # noqa: E402
from fake_gpu import FakeGpu  # noqa: E402

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
LINEARS_PER_LAYER = 7  # q k v o gate up down
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    """Quiet transformers; one torch thread (tiny matrices: on a busy 2-core box two threads are far slower)."""
    level, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(level)
    transformers.utils.logging.enable_progress_bar()


def build(cfg, path: Path, seed: int = 0, tweak=None) -> Path:
    """A random-weight model of ``cfg`` saved as safetensors (how a Hub checkpoint looks)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if tweak is not None:
        with torch.no_grad():
            tweak(model)
    model.save_pretrained(path, safe_serialization=True)
    return path


def plain_dir(out_dir: Path, dest: Path, dtype) -> Path:
    """The converted checkpoint dequantized by exmyconv.load_state_dict(dtype=...), as a plain HF folder."""
    if not dest.exists():
        dest.mkdir(parents=True)
        config = json.loads((out_dir / "config.json").read_text())
        del config["quantization_config"], config["attn_implementation"]  # (the guard: as `exmyconv dequantize`)
        (dest / "config.json").write_text(json.dumps(config))
        state = exmyconv.load_state_dict(str(out_dir), dtype=dtype)
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(dest / "model.safetensors"),
                                    metadata={"format": "pt"})
    return dest


def load_pair(out_dir: Path, dtype, auto=AutoModelForCausalLM, state_dtype="same"):
    """(quantized model via the exmy quantizer, plain dequantized model), both loaded in ``dtype``.

    The plain folder holds the weights dequantized to ``dtype`` (``state_dtype``: None = each
    tensor's source dtype, for models that keep some modules in float32)."""
    state_dtype = dtype if state_dtype == "same" else state_dtype
    quantized = auto.from_pretrained(out_dir, dtype=dtype)
    plain = auto.from_pretrained(plain_dir(out_dir, out_dir.parent / f"{out_dir.name}-plain-{state_dtype}",
                                           state_dtype), dtype=dtype)
    return quantized, plain


def exmy_linears(model) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExmyLinear)}


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def records(out_dir: Path) -> dict:
    with Checkpoint(str(out_dir)) as ckpt:
        return {name: rec for name, (rec, _) in ckpt.records.items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Llama, untied, two conversions: e2m2 per channel and e2m2s4 with groups of 64 (2 shards)."""
    root = tmp_path_factory.mktemp("llama")
    src = build(LlamaConfig(**SMALL, tie_word_embeddings=False), root / "src")
    exmyconv.quantize(str(src), str(root / "e2m2"), format="e2m2")
    exmyconv.quantize(str(src), str(root / "e2m2s4-g64"), format="e2m2s4", group_size=64, max_shard_size=150_000)
    return root


# ----------------------------------------------------------------------------- registration


def test_registered_with_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert hf.is_registered()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["exmy"] is ExmyConfig
    assert AUTO_QUANTIZER_MAPPING["exmy"] is hf.ExmyHfQuantizer
    hf.register()  # idempotent


def _python(code: str, args=()) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_exmyconv_stays_light_and_works_without_transformers():
    out = _python("""
        import sys, time
        t = time.perf_counter()
        import exmyconv
        took = time.perf_counter() - t
        assert "transformers" not in sys.modules and "torch" not in sys.modules, "import exmyconv got heavy"
        assert any(type(f).__name__ == "_RegistryFinder" for f in sys.meta_path), "no registration hook"
        print(round(took, 3))
    """)
    assert float(out) < 3.0
    # transformers missing altogether: exmyconv still imports and converts
    _python("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ImportError("no transformers here")
        sys.meta_path.insert(0, Block())
        import exmyconv
        assert callable(exmyconv.quantize) and not exmyconv.integrations.transformers.is_registered()
    """)


def test_user_flow_in_a_fresh_process(llama):
    """import exmyconv, then transformers' from_pretrained: registered by the import hook."""
    out = _python("""
        import sys, exmyconv
        assert "transformers" not in sys.modules
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        print(sum(type(m).__name__ == "ExmyLinear" for m in model.modules()))
    """, args=[str(llama / "e2m2")])
    assert int(out.split()[-1]) == SMALL["num_hidden_layers"] * LINEARS_PER_LAYER


def test_without_import_exmyconv_loading_fails_loudly(llama):
    """transformers alone only warns about an unknown quant_method and would build random weights in
    place of the quantized ones: the guard in config.json makes that an error that says what to do."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    code = textwrap.dedent("""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained(sys.argv[1])
        finally:
            assert "exmyconv" not in sys.modules
        print("LOADED")
    """)
    done = subprocess.run([sys.executable, "-c", code, str(llama / "e2m2")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode != 0 and "LOADED" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert "ValueError" in last and "import exmyconv before from_pretrained" in last, last
    # and what a user reads first says it too
    assert "import exmyconv" in (ROOT / "README.md").read_text()
    from exmyconv.check.inspection import render

    assert "`import exmyconv` first" in render(exmyconv.inspect(str(llama / "e2m2")))


def test_dequantize_takes_the_guard_out(llama, tmp_path):
    exmyconv.dequantize(str(llama / "e2m2"), str(tmp_path / "fp"))
    config = json.loads((tmp_path / "fp" / "config.json").read_text())
    assert "attn_implementation" not in config and "quantization_config" not in config
    AutoModelForCausalLM.from_pretrained(tmp_path / "fp")  # loads as a plain model


def test_registers_when_transformers_was_imported_first():
    _python("""
        import transformers.quantizers.auto as auto
        assert "exmy" not in auto.AUTO_QUANTIZER_MAPPING
        import exmyconv
        assert "exmy" in auto.AUTO_QUANTIZER_MAPPING and "exmy" in auto.AUTO_QUANTIZATION_CONFIG_MAPPING
    """)


# A transformers the quantizer cannot take, simulated by tampering in a fresh process, with
# exmyconv imported before transformers' quantizer registry (the import hook) or after it.
_UNSUPPORTED = [("transformers.__version__ = '5.16.0'", "exmyconv first"),
                ("transformers.__version__ = '6.0.0'", "transformers first"),
                ("from transformers.quantizers.base import HfQuantizer\n"
                 "if hasattr(HfQuantizer, 'update_weight_conversions'): del HfQuantizer.update_weight_conversions",
                 "transformers first")]


@pytest.mark.parametrize(("tamper", "order"), _UNSUPPORTED)
def test_unsupported_transformers_declines_with_one_warning(llama, order, tamper):
    """import exmyconv works, one single-line warning, nothing registered, plain models load; register() raises."""
    out = _python("""
        import json, sys, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every warning issued is recorded: once is exmyconv's doing
            import transformers
            exec(sys.argv[3])
            if sys.argv[2] == "transformers first":
                import transformers.quantizers.auto
            import exmyconv
            from transformers import AutoModelForCausalLM
            for _ in range(2):
                model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        from exmyconv.integrations import transformers as hf
        assert not hf.is_registered() and type(model).__name__ == "LlamaForCausalLM"
        import transformers  # from_pretrained may have put a fresh transformers module in sys.modules
        exec(sys.argv[3])
        try:
            hf.register()
            raise AssertionError("registered")
        except exmyconv.ExmyError as err:
            error = str(err)
        print(json.dumps([str(w.message) for w in caught if "exmyconv" in str(w.message)] + [error]))
    """, args=[str(llama / "src"), order, tamper])
    *warned, error = json.loads(out)
    assert len(warned) == 1, warned
    assert "\n" not in warned[0] and warned[0].startswith("exmyconv: ")
    assert "the 'exmy' quantization method is not registered" in warned[0] and "(>=5.16.1,<6)" in warned[0]
    assert "(>=5.16.1,<6)" in error


@pytest.mark.parametrize("order", ["exmyconv first", "transformers first"])
def test_unsupported_transformers_warning_as_error_breaks_nothing(order):
    """With exmyconv's warning turned into an error, neither transformers' import nor exmyconv's raises."""
    _python("""
        import sys, warnings
        warnings.filterwarnings("error", message="exmyconv")
        import transformers
        transformers.__version__ = "5.16.0"
        if sys.argv[1] == "transformers first":
            import transformers.quantizers.auto
        import exmyconv
        import transformers.quantizers.auto
        from transformers import AutoModelForCausalLM
        assert not exmyconv.integrations.transformers.is_registered()
    """, args=[order])


# ----------------------------------------------------------------------------- the torch dequantizer


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Odd shapes (K not a multiple of 128, ragged groups, 3-D), fp16 and bf16 scales, several formats."""
    rng = np.random.default_rng(7)
    src = tmp_path_factory.mktemp("zoo-src")
    tensors = {
        "a.weight": rng.standard_normal((48, 200)).astype(np.float32),
        "b.weight": rng.standard_normal((3, 20, 130)).astype(np.float32),
        "c.weight": rng.standard_normal((16, 256)).astype(np.float32),
    }
    tensors["c.weight"][3] *= 1e-12  # a group too small for fp16 scales: this tensor gets bf16 scales
    tensors["c.weight"][5] *= 1e5
    safetensors.torch.save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(src / "model.safetensors"))
    outs = {}
    for fmt, group in [("e2m2", None), ("e2m2s4", 64), ("e2m3s3", 100), ("e3m2", 96), ("e4m3", None),
                       ("e5m2", 32), ("e2m1", 64), ("e1m0", None)]:
        out = tmp_path_factory.mktemp(f"zoo-{fmt}") / "out"
        exmyconv.quantize(str(src), str(out), format=fmt, group_size=group)
        outs[(fmt, group)] = out
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_dequantize_equals_checkpoint_dequantize(zoo, dtype):
    code = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    scale_dtypes = set()
    for out in zoo.values():  # (the 1e5 row overflows fp16: inf on both sides)
        stored = safetensors.torch.load_file(str(out / "model.safetensors"))
        with Checkpoint(str(out)) as ckpt:
            for name, (rec, _) in ckpt.records.items():
                scale = stored[rec.scale_name]
                scale_dtypes.add(scale.dtype)
                got = dequantize(stored[rec.packed_name], scale, rec.fmt, rec.k, rec.group_size, dtype)
                with np.errstate(over="ignore"):
                    want = torch.from_numpy(ckpt.dequantize(name, code)).to(dtype)
                assert got.dtype == dtype and got.shape == want.shape
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (rec.fmt.name, name, dtype)
    assert scale_dtypes == {torch.float16, torch.bfloat16}


def test_torch_dequantize_small_chunks(zoo, monkeypatch):
    from exmyconv.torch import codec

    out = zoo[("e2m3s3", 100)]
    stored = safetensors.torch.load_file(str(out / "model.safetensors"))
    rec = records(out)["b.weight"]
    whole = dequantize(stored[rec.packed_name], stored[rec.scale_name], rec.fmt, rec.k, rec.group_size)
    monkeypatch.setattr(codec, "CHUNK_ELEMENTS", 300)  # two rows a step
    chunked = dequantize(stored[rec.packed_name], stored[rec.scale_name], rec.fmt, rec.k, rec.group_size)
    assert torch.equal(whole, chunked)


# ----------------------------------------------------------------------------- causal LMs


@pytest.mark.parametrize("variant", ["e2m2", "e2m2s4-g64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_modules_replaced_and_logits_bitwise(llama, variant, dtype):
    out = llama / variant
    quantized, plain = load_pair(out, dtype)
    replaced = exmy_linears(quantized)
    assert len(replaced) == SMALL["num_hidden_layers"] * LINEARS_PER_LAYER
    recs = records(out)
    for name, module in replaced.items():
        rec = recs[name + ".weight"]
        assert (module.fmt, module.group_size, module.in_features) == (rec.fmt, rec.group_size, rec.k)
        assert module.weight_packed.dtype == torch.uint8 and module.weight_packed.shape == rec.packed_shape
        assert module.weight_scale.dtype in (torch.float16, torch.bfloat16)
    assert type(quantized.lm_head) is torch.nn.Linear  # embeddings/lm_head were not quantized
    assert quantized.is_quantized and quantized.config.quantization_config.quant_method == "exmy"
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(quantized, ids), logits(plain, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_llama_greedy_generate_same_tokens(llama, dtype):
    quantized, plain = load_pair(llama / "e2m2", dtype)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    got, want = quantized.generate(ids, **kw), plain.generate(ids, **kw)
    assert got.shape == (2, 26)
    assert torch.equal(got, want)


def test_automodel_loads_the_base_model(llama):
    quantized, plain = load_pair(llama / "e2m2s4-g64", torch.float32, auto=AutoModel)
    assert type(quantized).__name__ == "LlamaModel"
    assert len(exmy_linears(quantized)) == SMALL["num_hidden_layers"] * LINEARS_PER_LAYER
    ids = torch.randint(0, SMALL["vocab_size"], (1, 9))
    assert torch.equal(logits(quantized, ids), logits(plain, ids))


def test_to_dtype_keeps_stored_scales(tmp_path):
    """bf16 scales must not be rounded to fp16 by model.to(torch.float16)."""
    def tiny_row(model):
        model.model.layers[0].self_attn.q_proj.weight[3] *= 1e-12  # forces bf16 scales for this tensor

    src = build(LlamaConfig(**SMALL), tmp_path / "src", seed=3, tweak=tiny_row)
    out = tmp_path / "out"
    exmyconv.quantize(str(src), str(out), format="e3m2", group_size=32)
    quantized, plain = load_pair(out, torch.float32)
    q_proj = quantized.model.layers[0].self_attn.q_proj
    before = q_proj.weight_scale.clone()
    assert before.dtype == torch.bfloat16
    quantized.to(torch.float16)
    plain.to(torch.float16)  # (also casts buffers such as RoPE's inv_freq, so compare like with like)
    assert q_proj.weight_scale.dtype == torch.bfloat16 and torch.equal(q_proj.weight_scale, before)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7))
    assert torch.equal(logits(quantized, ids), logits(plain, ids))


def test_quantized_embeddings_untied(tmp_path):
    src = build(Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False), tmp_path / "src")
    out = tmp_path / "out"
    exmyconv.quantize(str(src), str(out), format="e2m2", group_size=64, quantize_embeddings=True)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(records(out))
    quantized, plain = load_pair(out, torch.bfloat16)
    assert isinstance(quantized.lm_head, ExmyLinear)  # an untied lm_head is a Linear like any other
    emb = quantized.model.embed_tokens  # an untied nn.Embedding stays packed; a lookup decodes its rows
    assert isinstance(emb, ExmyEmbedding) and emb.weight.dtype == torch.bfloat16
    assert torch.equal(emb.weight, plain.model.embed_tokens.weight)
    packed = emb.weight_packed.numel() + emb.weight_scale.numel() * emb.weight_scale.element_size()
    assert packed < 0.4 * plain.model.embed_tokens.weight.numel() * 2  # e2m2-g64: about 5.25 of 16 bits
    assert "weight" not in dict(emb.named_parameters())
    ids = torch.randint(0, SMALL["vocab_size"], (2, 8))
    assert torch.equal(emb(ids), plain.model.embed_tokens(ids))
    assert torch.equal(logits(quantized, ids), logits(plain, ids))
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(quantized.generate(ids, **kw), plain.generate(ids, **kw))
    torch._dynamo.reset()  # the whole model compiles as one graph (the lookup is the exmyconv::embedding op)
    compiled = torch.compile(quantized, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).logits, logits(plain, ids))
    quantized.dequantize()  # back to an nn.Embedding holding the decoded table
    assert type(quantized.model.embed_tokens) is torch.nn.Embedding
    assert torch.equal(quantized.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    assert torch.equal(logits(quantized, ids), logits(plain, ids))


@pytest.mark.parametrize("embeddings", [True, False])
def test_tied_embeddings_stay_tied(tmp_path, embeddings):
    src = build(Qwen2Config(**SMALL, tie_word_embeddings=True), tmp_path / "src")  # q/k/v have biases
    out = tmp_path / "out"
    exmyconv.quantize(str(src), str(out), format="e2m2s4", quantize_embeddings=embeddings)
    assert ("model.embed_tokens.weight" in records(out)) == embeddings
    quantized, plain = load_pair(out, torch.float32)
    assert type(quantized.lm_head) is torch.nn.Linear
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight
    assert torch.equal(quantized.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    assert len(exmy_linears(quantized)) == SMALL["num_hidden_layers"] * LINEARS_PER_LAYER
    assert quantized.model.layers[0].self_attn.q_proj.bias is not None
    assert torch.equal(quantized.model.layers[0].self_attn.q_proj.bias, plain.model.layers[0].self_attn.q_proj.bias)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 8))
    assert torch.equal(logits(quantized, ids), logits(plain, ids))


def test_dequantize_and_save(llama, tmp_path):
    quantized, plain = load_pair(llama / "e2m2s4-g64", torch.float32)
    with pytest.raises(ValueError, match="not serializable"):
        quantized.save_pretrained(tmp_path / "nope")
    quantized.dequantize()
    assert not exmy_linears(quantized) and not getattr(quantized, "is_quantized", False)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 8))
    assert torch.equal(logits(quantized, ids), logits(plain, ids))
    quantized.save_pretrained(tmp_path / "plain")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    assert torch.equal(logits(again, ids), logits(plain, ids))


MOE = {
    # (Qwen3-MoE's experts stay packed: tests/test_experts.py)
    # 3-D expert tensors in the checkpoint itself (and 2-D expert biases, also quantized)
    "gptoss": (lambda: GptOssConfig(**{**SMALL, "intermediate_size": 128}, head_dim=32, num_local_experts=4,
                                    num_experts_per_tok=2, layer_types=["full_attention"] * 2),
               "model.layers.0.mlp.experts.gate_up_proj"),
}


@pytest.mark.parametrize("arch", sorted(MOE))
def test_moe_experts_dequantized_at_load(tmp_path, arch):
    make_config, expert_record = MOE[arch]
    src = build(make_config(), tmp_path / "src")
    out = tmp_path / "out"
    exmyconv.quantize(str(src), str(out), format="e2m2", group_size=32)
    assert expert_record in records(out)
    quantized, plain = load_pair(out, torch.float32)
    assert len(exmy_linears(quantized)) == SMALL["num_hidden_layers"] * 4  # attention only
    experts_q, experts_p = quantized.model.layers[1].mlp.experts, plain.model.layers[1].mlp.experts
    assert experts_q.gate_up_proj.dim() == 3
    assert torch.equal(experts_q.gate_up_proj, experts_p.gate_up_proj)
    assert torch.equal(experts_q.down_proj, experts_p.down_proj)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 8))
    assert torch.equal(logits(quantized, ids), logits(plain, ids))


# transformers splits some checkpoint tensors on load (one source, several targets); the quantizer
# then adds T_packed / T_scale as sources, which transformers allows from 5.23 on.
SPLITS = Version(transformers.__version__) >= Version("5.23")


@pytest.fixture(scope="module")
def hrm(tmp_path_factory):
    """HRM-text: fused mlp.gate_up_proj and attn.gqkv_proj in the checkpoint, split into the model's Linears."""
    root = tmp_path_factory.mktemp("hrm")
    cfg = HrmTextConfig(**{k: v for k, v in SMALL.items() if k != "num_key_value_heads"}, head_dim=32,
                        num_layers_per_stack=1, H_cycles=1, L_cycles=1)
    exmyconv.quantize(str(build(cfg, root / "src")), str(root / "out"), format="e2m2", group_size=32)
    assert "model.H_module.layers.0.mlp.gate_up_proj.weight" in records(root / "out")
    return root / "out"


@pytest.mark.skipif(not SPLITS, reason=f"transformers {transformers.__version__} (< 5.23) cannot load quantized "
                                       "tensors that it splits; test_tensor_split_on_load_refused_before_5_23 checks "
                                       "the error")
def test_tensor_split_on_load(hrm):
    quantized, plain = load_pair(hrm, torch.float32)
    layer = quantized.model.H_module.layers[0]
    assert type(layer.mlp.gate_proj) is torch.nn.Linear and isinstance(layer.mlp.down_proj, ExmyLinear)
    assert torch.equal(layer.mlp.up_proj.weight, plain.model.H_module.layers[0].mlp.up_proj.weight)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 8))
    assert torch.equal(logits(quantized, ids), logits(plain, ids))


@pytest.mark.skipif(SPLITS, reason=f"transformers {transformers.__version__} >= 5.23 loads split tensors")
def test_tensor_split_on_load_refused_before_5_23(hrm):
    with pytest.raises(exmyconv.ExmyError, match=r"cannot load quantized tensors that it splits on load .*>= 5\.23"):
        AutoModelForCausalLM.from_pretrained(hrm, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_t5_keeps_its_fp32_modules(tmp_path, dtype):
    """Seq2seq; T5 reads ``wo.weight`` in forward and keeps ``wo`` in float32 when loaded in fp16."""
    cfg = T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   decoder_start_token_id=0)
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(cfg).save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    exmyconv.quantize(str(tmp_path / "src"), str(out), format="e2m2", group_size=32)
    quantized, plain = load_pair(out, dtype, auto=AutoModelForSeq2SeqLM, state_dtype=None)
    wo = quantized.encoder.block[0].layer[1].DenseReluDense.wo
    if dtype == torch.float16:  # dequantized at load into the float32 parameter, like the plain model
        assert type(wo) is torch.nn.Linear and wo.weight.dtype == torch.float32
        assert torch.equal(wo.weight, plain.encoder.block[0].layer[1].DenseReluDense.wo.weight)
    else:  # an ExmyLinear whose .weight (read by T5) is a dequantized copy
        assert isinstance(wo, ExmyLinear) and wo.weight.dtype == torch.float32
    ids, dec = torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        got = quantized(input_ids=ids, decoder_input_ids=dec).logits
        want = plain(input_ids=ids, decoder_input_ids=dec).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("scales8", [False, True])
def test_packed_embedding_lookup_decodes_exact_rows(scales8):
    """Fresh random tables: a lookup of any shape of ids equals the rows of the dequantized table bit for bit
    (8-bit scales too), .to(dtype) changes the lookup dtype but never the stored scales."""
    from exmyconv.format.exmy import get_format
    from exmyconv.format.quant import quantize

    rng = np.random.default_rng(11)
    q = quantize((rng.standard_normal((50, 96)) * 0.05).astype(np.float32), get_format("e2m1"), 32, scales8=scales8)
    scale_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn}[q.scale_dtype]
    emb = ExmyEmbedding(50, 96, "e2m1", 32, padding_idx=0, scale_dtype=scale_dtype,
                        scale_exp=q.scale_exp if scales8 else None, dtype=torch.float32)
    emb.weight_packed.copy_(torch.from_numpy(q.payload))
    emb.weight_scale.copy_(torch.from_numpy(q.scales * np.float32(2.0 ** -q.scale_exp)).to(scale_dtype))
    table = torch.from_numpy(q.dequantize())
    ids = torch.from_numpy(rng.integers(0, 50, (3, 7)))
    got = emb(ids)
    assert got.shape == (3, 7, 96) and not torch.isnan(got).any() and torch.equal(got, table[ids])
    before = emb.weight_scale.clone()
    emb.to(torch.bfloat16)
    assert emb.weight_scale.dtype == scale_dtype and torch.equal(emb.weight_scale.view(torch.uint8),
                                                                 before.view(torch.uint8))
    assert torch.equal(emb(ids), table[ids].to(torch.bfloat16))
    assert "padding_idx=0" in repr(emb)
    # under torch.compile: one custom op (fullgraph holds), the same rows
    from exmyconv.torch.embedding import embedding_op

    if not scales8:  # (opcheck's schema test multiplies the inputs, which float8 tensors do not support on CPU)
        torch.library.opcheck(embedding_op, (ids, emb.weight_packed, emb.weight_scale, emb._handle, torch.bfloat16))
    assert torch.equal(torch.compile(emb, fullgraph=True)(ids), emb(ids))
    for bad in (-1, 50):  # refused like nn.Embedding's (no host synchronisation to check)
        with pytest.raises(IndexError):
            emb(torch.tensor([bad]))


def test_minilm_embeddings_equal(tmp_path):
    out = tmp_path / "minilm"
    exmyconv.quantize("@minilm", str(out), format="e2m2", group_size=128, quantize_embeddings=True)
    quantized = AutoModel.from_pretrained(out, dtype=torch.float32)
    plain = AutoModel.from_pretrained(example_dir("minilm"), dtype=torch.float32)
    state = exmyconv.load_state_dict(str(out), dtype=torch.float32)
    plain.load_state_dict(state, strict=False)
    assert len(exmy_linears(quantized)) == 6 * 6 + 1  # q k v, attention out, intermediate, out; pooler
    assert torch.equal(quantized.embeddings.word_embeddings.weight, state["embeddings.word_embeddings.weight"])
    ids = torch.randint(1000, 30000, (2, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        got = quantized(input_ids=ids, attention_mask=mask).last_hidden_state
        want = plain(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- errors


def test_refuses_to_quantize_a_plain_model(llama):
    with pytest.raises(ValueError, match="pre-quantized|exmyconv quantize"):
        AutoModelForCausalLM.from_pretrained(llama / "src", quantization_config=ExmyConfig())


def test_refuses_an_unknown_layout_major_version(llama, tmp_path):
    import shutil

    out = tmp_path / "v2"
    shutil.copytree(llama / "e2m2", out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = "3.0"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="version 3.0"):
        AutoModelForCausalLM.from_pretrained(out)


# ----------------------------------------------------------------------------- the GPU hook


def _small_linear(bias=True, fmt="e2m2", k=200, n=24):
    rng = np.random.default_rng(5)
    from exmyconv.format.exmy import get_format
    from exmyconv.format.quant import quantize

    qt = quantize(rng.standard_normal((n, k)).astype(np.float32), get_format(fmt), 64)
    layer = ExmyLinear(k, n, fmt, 64, bias=bias, scale_dtype=torch.float16)
    layer.weight_packed.copy_(torch.from_numpy(qt.payload))
    layer.weight_scale.copy_(torch.from_numpy(qt.scales))
    if bias:
        layer.bias.data = torch.randn(n)
    return layer


def test_cpu_forward_never_touches_the_gpu_backend(monkeypatch):
    from exmyconv.torch import linear

    def boom():
        raise AssertionError("GPU backend consulted for a CPU input")

    monkeypatch.setattr(linear, "_gpu_backend", boom)
    layer = _small_linear()
    x = torch.randn(3, 5, 200)
    want = torch.nn.functional.linear(x, layer.dequantize_weight(torch.float32), layer.bias)
    assert torch.equal(layer(x), want)


def test_gpu_hook_dispatch_with_a_fake_backend(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))  # CPU here
    layer = _small_linear().to(torch.bfloat16)  # a bf16 model: bias in bf16, scales stay fp16
    assert layer.weight_scale.dtype == torch.float16
    def upload_check(scale_dtype, shape, group_size):
        assert scale_dtype == "F16" and shape == (24, 200) and group_size == 64

    gpu = FakeGpu(upload_check)
    w = layer.dequantize_weight(torch.bfloat16)
    small = torch.randn(2, 8, 200, dtype=torch.bfloat16)  # 16 rows: fused GEMV
    y = layer._gpu_compute(gpu, small)
    assert y.shape == (2, 8, 24) and "gemv:16" in gpu.calls
    assert torch.equal(y, torch.nn.functional.linear(small, w) + layer.bias)
    big = torch.randn(17, 200, dtype=torch.bfloat16)  # 17 rows: dequantize + F.linear
    y = layer._gpu_compute(gpu, big)
    assert gpu.calls[-1] == "dequantize:BF16" and not any(c == "gemv:17" for c in gpu.calls)
    assert torch.equal(y, torch.nn.functional.linear(big, w, layer.bias))
    assert gpu.calls.count("upload:row") == 1  # the uploaded view is kept while the buffers stay put (N = 24: rows)
    # x as the kernel cannot read it in place (a transposed view, an odd address), or 1-d: the same values
    base = torch.randn(2 * 200 + 1, dtype=torch.bfloat16)
    for x in (torch.randn(200, 3, dtype=torch.bfloat16).t(), base[1:201], base[1:401].view(2, 200)):
        y = layer._gpu_compute(gpu, x)
        assert y.shape == (*x.shape[:-1], 24) and gpu.calls[-1] == f"gemv:{x.numel() // 200}"
        assert torch.equal(y, torch.nn.functional.linear(x, w) + layer.bias)
    with pytest.raises(RuntimeError):  # a wrong last dimension: F.linear's error, as nn.Linear gives
        layer._gpu_compute(gpu, torch.randn(2, 100, dtype=torch.bfloat16))
    layer.to(torch.float16)  # buffers re-created: upload again
    layer._gpu_compute(gpu, small.half())
    assert gpu.calls.count("upload:row") == 2


def test_gpu_forward_declines_what_it_cannot_run(monkeypatch):
    from exmyconv.torch import linear

    layer = _small_linear(fmt="e2m2s4")
    monkeypatch.setattr(linear, "_gpu_backend", lambda: FakeGpu())
    x = torch.randn(2, 200)
    assert layer._gpu_forward(x) is None  # fp32 input, CPU buffers, shared format


# --------------------------------------------------------------------------- torch.compile

def test_compiled_op_passes_opcheck():
    layer = _small_linear()
    x = torch.randn(3, 200)
    torch.library.opcheck(torch.ops.exmyconv.linear.default,
                          (x, layer.weight_packed, layer.weight_scale, layer.bias, layer._handle))


def test_compiled_model_is_one_graph_and_equals_eager():
    """fullgraph=True: the layer compiles into the graph as the custom op (no graph break), same values."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(_small_linear(), torch.nn.GELU(), torch.nn.Linear(24, 5))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for shape in ((4, 200), (2, 3, 200)):
        x = torch.randn(*shape)
        assert torch.equal(compiled(x), model(x))


def test_copies_get_their_own_handle():
    import copy
    import pickle

    layer = _small_linear()
    clone = copy.deepcopy(layer)
    unpickled = pickle.loads(pickle.dumps(layer))
    assert len({layer._handle, clone._handle, unpickled._handle}) == 3
    clone.weight_scale.mul_(2)  # the copy's own scales: the op must use the copy, not the original
    x = torch.randn(2, 200)
    op = torch.ops.exmyconv.linear
    assert torch.equal(op(x, clone.weight_packed, clone.weight_scale, clone.bias, clone._handle), clone(x))
    assert not torch.equal(clone(x), layer(x))


def test_eager_input_gradients_go_through_the_op(monkeypatch):
    """The eager CUDA path (fused GEMV) records nothing for autograd, so a forward that needs x's
    gradient takes the op (its backward multiplies by the dequantized weight): here _forward is
    replaced by a computation autograd cannot see, as the GEMV is; x and bias still get their
    gradients. Under no_grad, _forward itself runs."""
    layer = _small_linear()
    w = layer.dequantize_weight(torch.float32)
    untracked = []

    def gemv_like(x):
        untracked.append(x.shape)
        return torch.nn.functional.linear(x.detach(), w, layer.bias.detach())

    monkeypatch.setattr(layer, "_forward", gemv_like)
    x = torch.randn(3, 200, requires_grad=True)
    layer(x).square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, b2).square().sum().backward()
    assert untracked and x.grad is not None and layer.bias.grad is not None
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6) and torch.allclose(layer.bias.grad, b2.grad)
    with torch.no_grad():
        before = len(untracked)
        layer(x)
        assert len(untracked) == before + 1


def test_compiled_op_gradients_match_the_dequantized_linear():
    layer = _small_linear()
    x = torch.randn(3, 200, requires_grad=True)
    torch.ops.exmyconv.linear(x, layer.weight_packed, layer.weight_scale, layer.bias, layer._handle).square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, layer.dequantize_weight(torch.float32), b2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6) and torch.allclose(layer.bias.grad, b2.grad)
