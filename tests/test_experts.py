"""MoE experts stay packed: ExmyExperts (exmyconv.torch.experts) loaded by the transformers quantizer.

Small random-weight Qwen3-MoE, Qwen2-MoE and Mixtral models, built offline from real transformers configs, are
converted and loaded with ``from_pretrained``. Reference: the same conversion dequantized by
``exmyconv dequantize`` and loaded by plain transformers with ``experts_implementation="eager"``
(the computation ExmyExperts' CPU path repeats, expert by expert): logits are compared bitwise and
greedy generation token by token. Memory: parameters plus buffers of the loaded model against the
plain model's.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from packaging.version import Version

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig  # noqa: E402

import exmyconv  # noqa: E402
from exmyconv.convert.dequantize import dequantize_checkpoint  # noqa: E402
from exmyconv.io.checkpoint import Checkpoint  # noqa: E402
from exmyconv.torch.experts import ExmyExperts, ExpertWeights  # noqa: E402
from test_hf import _quiet_single_thread  # noqa: E402,F401 (autouse: quiet transformers, one torch thread)

SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             vocab_size=256, max_position_embeddings=256)
ARCHS = {
    # per-expert checkpoint tensors experts.N.{gate,up,down}_proj.weight, merged by transformers on load
    "qwen3moe": lambda: Qwen3MoeConfig(**SMALL, intermediate_size=256, moe_intermediate_size=128, num_experts=8,
                                       num_experts_per_tok=2),
    # the same with a shared expert (ordinary Linears) and its gate
    "qwen2moe": lambda: Qwen2MoeConfig(**SMALL, intermediate_size=256, moe_intermediate_size=128,
                                       shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2),
    # experts.N.w1/w3/w2 under block_sparse_moe (renamed to mlp on load)
    "mixtral": lambda: MixtralConfig(**SMALL, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
}
CONVERSIONS = {"e2m2": {}, "e2m2s4-g64": {"format": "e2m2s4", "group_size": 64},
               # 8-bit scales: one scale_exp per expert stack; --format auto: one format per expert stack
               "e2m1-g32-e4m3": {"format": "e2m1", "group_size": 32, "scales": "e4m3"},
               "auto-5": {"format": "auto", "bits": 5}}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def converted(request, tmp_path_factory):
    """{conversion: (exmy folder, its `exmyconv dequantize` folder)} and the source folder of one architecture."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(ARCHS[request.param]()).save_pretrained(root / "src")
    out = {}
    for name, options in CONVERSIONS.items():
        exmyconv.quantize(str(root / "src"), str(root / name), **{"format": "e2m2", **options})
        dequantize_checkpoint(str(root / name), str(root / f"{name}-plain"), progress=False)
        out[name] = (root / name, root / f"{name}-plain")
    return request.param, root / "src", out


def _resident_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _experts_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for name, t in [*model.named_parameters(), *model.named_buffers()]
               if ".experts." in name)


@pytest.mark.parametrize("conversion", sorted(CONVERSIONS))
def test_experts_load_packed_and_compute_like_the_plain_model(converted, conversion):
    arch, source, folders = converted
    out, plain_dir = folders[conversion]
    with Checkpoint(str(out)) as ckpt:  # the checkpoint holds per-expert 2-D records
        assert any(".experts.3." in name for name in ckpt.records)
    from exmyconv.check.inspection import inspect_checkpoint

    stacks = inspect_checkpoint(str(out))["expert_stacks"]  # (every stack agrees: quantize tied them)
    assert stacks == {"stacks": 2 * SMALL["num_hidden_layers"], "mixed": []}
    quantized = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32, experts_implementation="eager")
    layers = SMALL["num_hidden_layers"]
    experts = [m for m in quantized.modules() if isinstance(m, ExmyExperts)]
    assert len(experts) == layers and all(m.mlp.experts in experts for m in quantized.model.layers)
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name, _ in
                   quantized.named_parameters())
    # the loaded buffers are the checkpoint's packed tensors stacked, and decode to the plain weights
    for i, layer in enumerate(quantized.model.layers):
        ref = plain.model.layers[i].mlp.experts
        for leaf in ("gate_up_proj", "down_proj"):
            assert torch.equal(layer.mlp.experts.dequantize_weight(leaf, None, torch.float32), getattr(ref, leaf))
    # memory: the experts take about 5/32 of their float32 size (e2m2 is 5 bits), nothing else holds them
    ratio = _experts_bytes(quantized) / _experts_bytes(plain)
    assert ratio < 0.2, ratio
    assert _resident_bytes(quantized) < 0.3 * _resident_bytes(plain)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = quantized(input_ids=ids).logits, plain(input_ids=ids).logits
    assert not torch.isnan(got).any() and torch.equal(got, want)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(quantized.generate(ids[:1], **greedy), plain.generate(ids[:1], **greedy))


@pytest.mark.parametrize("conversion", ["e2m2", "e2m1-g32-e4m3"])
def test_bf16_logits_and_dequantize_back(converted, conversion):
    arch, source, folders = converted
    if arch == "mixtral" and Version(transformers.__version__) < Version("5.21"):
        pytest.xfail("transformers <= 5.20 keeps the checkpoint dtype of renamed tensors (no get_new_dtype hook): "
                     "Mixtral's router block_sparse_moe.gate -> mlp.gate stays float32 in a bf16 load of a float32 "
                     "checkpoint (as on main, experts aside)")
    out, plain_dir = folders[conversion]
    quantized = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.bfloat16, experts_implementation="eager")
    bf16_source = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    assert _resident_bytes(quantized) < 0.6 * _resident_bytes(bf16_source)
    assert _experts_bytes(quantized) < 0.4 * _experts_bytes(bf16_source)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(quantized(input_ids=ids).logits, plain(input_ids=ids).logits)
    quantized.dequantize()  # the experts modules come back with their decoded 3-D parameters
    assert not any(isinstance(m, ExmyExperts) for m in quantized.modules())
    quantized.set_experts_implementation("eager")
    with torch.no_grad():
        assert torch.equal(quantized(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_mixed_formats_fall_back_to_dequantizing(tmp_path):
    """gate and up of one layer in different formats (as --format auto may choose): that converter's
    experts all dequantize at load (the previous path), and the model still computes like the plain one."""
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(ARCHS["qwen3moe"]()).save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    exmyconv.quantize(str(tmp_path / "src"), str(out), format="e2m2")
    # rewrite one expert's up_proj of layer 1 in e3m2 (another row width): a valid checkpoint of mixed formats
    _requantize(out, "model.layers.1.mlp.experts.2.up_proj.weight", "e3m2")
    # inspect names the stack that loaders cannot stack
    from exmyconv.check.inspection import inspect_checkpoint, render

    report = inspect_checkpoint(str(out))
    assert report["expert_stacks"] == {"stacks": 4, "mixed": ["model.layers.1.mlp.experts.*.gate/up"]}
    assert "4, 1 mixed" in render(report)
    dequantize_checkpoint(str(out), str(tmp_path / "plain"), progress=False)
    quantized = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32,
                                                 experts_implementation="eager")
    assert not any(isinstance(m, ExmyExperts) for m in quantized.modules())
    quantized.set_experts_implementation("eager")
    ids = torch.randint(0, SMALL["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(quantized(input_ids=ids).logits, plain(input_ids=ids).logits)


@pytest.mark.parametrize("scales, factor", [("16", 1e-4), ("e4m3", 64.0)])
def test_experts_of_a_stack_share_their_scale_choice(tmp_path, scales, factor):
    """One expert's weights far from the others' (on its own: bf16 scales instead of fp16, or a higher 8-bit
    scale_exp): quantize makes one choice for the whole stack, so the layer still loads packed and computes
    like the plain model; the other layer's stacks keep the usual choice."""
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(ARCHS["qwen3moe"]())
    small = "model.layers.1.mlp.experts.5.gate_proj.weight"
    with torch.no_grad():
        model.model.layers[1].mlp.experts.gate_up_proj[5].mul_(factor)  # saved as experts.5.gate_proj / up_proj
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    exmyconv.quantize(str(tmp_path / "src"), str(out), format="e2m2", group_size=32, scales=scales)
    with Checkpoint(str(out)) as ckpt:
        def choice(name):
            record, f = ckpt.records[name]
            return record.scale_exp if scales == "e4m3" else f.tensors[record.scale_name].dtype
        stack = [n for n in ckpt.records if n.startswith("model.layers.1.mlp.experts.") and "down_proj" not in n]
        assert small in stack and len(stack) == 16
        assert len({choice(n) for n in stack}) == 1
        other = {choice(n) for n in ckpt.records if n.startswith("model.layers.0.mlp.experts.")}
        assert other != {choice(small)}  # the odd expert moved its stack's choice
    dequantize_checkpoint(str(out), str(tmp_path / "plain"), progress=False)
    quantized = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32,
                                                 experts_implementation="eager")
    assert sum(isinstance(m, ExmyExperts) for m in quantized.modules()) == SMALL["num_hidden_layers"]
    ids = torch.randint(0, SMALL["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = quantized(input_ids=ids).logits
        assert not torch.isnan(got).any() and torch.equal(got, plain(input_ids=ids).logits)


def _requantize(folder: Path, name: str, fmt: str) -> None:
    """Replace one record of a single-file checkpoint by the same tensor quantized in ``fmt``."""
    import safetensors
    import safetensors.torch

    from exmyconv.format.exmy import get_format
    from exmyconv.format.quant import quantize

    path = folder / "model.safetensors"
    with safetensors.safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    record = json.loads(meta[f"exmy:{name}"])
    w = exmyconv.load_state_dict(str(folder), dtype=torch.float32)[name]
    q = quantize(w.numpy(), get_format(fmt), None)
    tensors[name + "_packed"] = torch.from_numpy(q.payload)
    scale_dtype = torch.float16 if q.scale_dtype == "F16" else torch.bfloat16
    tensors[name + "_scale"] = torch.from_numpy(q.scales).to(scale_dtype)
    record["format"] = fmt
    meta[f"exmy:{name}"] = json.dumps(record)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def test_module_checks_its_layout():
    gate_up, down = ExpertWeights("e2m2", 64, 96, None, torch.float16), ExpertWeights("e2m2", 48, 64, None,
                                                                                       torch.float16)
    experts = ExmyExperts(3, gate_up, down, torch.nn.SiLU())
    assert experts.gate_up_proj_packed.shape[:2] == (3, 96) and experts.down_proj_scale.shape == (3, 64, 1)
    with pytest.raises(exmyconv.ExmyError, match="do not fit"):
        ExmyExperts(3, gate_up, ExpertWeights("e2m2", 40, 64, None, torch.float16), torch.nn.SiLU())
    # .to(dtype) keeps the stored scales bit for bit (bf16 scales would round in fp16)
    experts = ExmyExperts(3, gate_up, ExpertWeights("e2m2", 48, 64, None, torch.bfloat16), torch.nn.SiLU())
    experts.down_proj_scale.fill_(1 / 3)
    before = experts.down_proj_scale.clone()
    experts.half()
    assert experts.down_proj_scale.dtype == torch.bfloat16 and torch.equal(experts.down_proj_scale, before)
    assert experts.weight_dtype == torch.float16


def test_cpu_forward_against_a_dense_oracle(rng):
    """Random packed experts (fresh payload bytes, small scales): the output equals a dense float64
    computation from the decoded weights within float32 rounding; every token is written."""
    from exmyconv.format.exmy import get_format
    from exmyconv.format.quant import quantize

    e, h, i = 5, 96, 64
    specs, data = {}, {}
    for leaf, (n, k) in {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}.items():
        q = quantize(rng.standard_normal((e, n, k)).astype(np.float32) * 0.1, get_format("e2m2s4"), 32)
        dt = torch.float16 if q.scale_dtype == "F16" else torch.bfloat16
        specs[leaf] = ExpertWeights("e2m2s4", k, n, 32, dt)
        data[leaf] = (torch.from_numpy(q.payload), torch.from_numpy(q.scales).to(dt))
    experts = ExmyExperts(e, specs["gate_up_proj"], specs["down_proj"], torch.nn.SiLU(), dtype=torch.float32)
    for leaf, (packed, scale) in data.items():
        getattr(experts, leaf + "_packed").copy_(packed)
        getattr(experts, leaf + "_scale").copy_(scale)
    tokens, top_k = 6, 3
    x = torch.from_numpy(rng.standard_normal((tokens, h)).astype(np.float32))
    weights, index = torch.softmax(torch.from_numpy(rng.standard_normal((tokens, e))), -1).topk(top_k)
    y = experts(x, index, weights.float())
    gu = experts.dequantize_weight("gate_up_proj", None, torch.float64)
    dn = experts.dequantize_weight("down_proj", None, torch.float64)
    want = torch.zeros(tokens, h, dtype=torch.float64)
    for t in range(tokens):
        for j in range(top_k):
            gate, up = (gu[index[t, j]] @ x[t].double()).chunk(2)
            want[t] += weights[t, j] * (dn[index[t, j]] @ (torch.nn.functional.silu(gate) * up))
    assert torch.isfinite(y).all() and (want.norm(dim=1) > 0).all()
    assert torch.allclose(y.double(), want, rtol=1e-4, atol=1e-5), (y.double() - want).abs().max()


def test_fused_3d_expert_records_load_into_the_buffers(tmp_path):
    """A checkpoint that stores the experts fused (3-D gate_up_proj / down_proj, as the model holds them):
    each record loads into ExmyExperts' buffers unchanged, no converter involved."""
    import safetensors
    import safetensors.torch

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(ARCHS["qwen3moe"]())
    src = tmp_path / "src"
    model.save_pretrained(src)  # (config.json etc.; the weights are replaced by the fused state dict)
    for f in src.glob("*.safetensors"):
        f.unlink()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or
             not model.config.tie_word_embeddings}
    safetensors.torch.save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    exmyconv.quantize(str(src), str(out), format="e2m2s4", group_size=64)
    with Checkpoint(str(out)) as ckpt:
        assert tuple(ckpt.records["model.layers.1.mlp.experts.gate_up_proj"][0].shape) == (8, 256, 128)
    dequantize_checkpoint(str(out), str(tmp_path / "plain"), progress=False)
    quantized = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32,
                                                 experts_implementation="eager")
    experts = quantized.model.layers[1].mlp.experts
    assert isinstance(experts, ExmyExperts)
    with safetensors.safe_open(str(out / "model.safetensors"), "pt") as fh:
        for leaf in ("gate_up_proj", "down_proj"):
            for suffix in ("_packed", "_scale"):
                stored = fh.get_tensor(f"model.layers.1.mlp.experts.{leaf}{suffix}")
                assert torch.equal(getattr(experts, leaf + suffix), stored)  # same bytes, same dtype
    ids = torch.randint(0, SMALL["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(quantized(input_ids=ids).logits, plain(input_ids=ids).logits)


# --------------------------------------------------------------------------- torch.compile

def _small_experts(rng, e=5, h=96, i=64, fmt="e2m2", group=32):
    from exmyconv.format.exmy import get_format
    from exmyconv.format.quant import quantize

    specs, data = {}, {}
    for leaf, (n, k) in {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}.items():
        q = quantize(rng.standard_normal((e, n, k)).astype(np.float32) * 0.1, get_format(fmt), group)
        dt = torch.float16 if q.scale_dtype == "F16" else torch.bfloat16
        specs[leaf] = ExpertWeights(fmt, k, n, group, dt)
        data[leaf] = (torch.from_numpy(q.payload), torch.from_numpy(q.scales).to(dt))
    experts = ExmyExperts(e, specs["gate_up_proj"], specs["down_proj"], torch.nn.SiLU(), dtype=torch.float32)
    for leaf, (packed, scale) in data.items():
        getattr(experts, leaf + "_packed").copy_(packed)
        getattr(experts, leaf + "_scale").copy_(scale)
    return experts


class _Routed(torch.nn.Module):
    """A router (top-k of a softmax) in front of the experts, as a MoE block calls them."""

    def __init__(self, experts, top_k=2):
        super().__init__()
        self.experts, self.top_k = experts, top_k
        self.gate = torch.nn.Linear(experts.hidden_dim, experts.num_experts, bias=False)

    def forward(self, x):
        weights, index = torch.softmax(self.gate(x), -1).topk(self.top_k)
        return self.experts(x, index, weights)


def test_experts_op_passes_opcheck(rng):
    experts = _small_experts(rng)
    x = torch.from_numpy(rng.standard_normal((4, experts.hidden_dim)).astype(np.float32))
    weights, index = torch.softmax(torch.randn(4, experts.num_experts), -1).topk(2)
    torch.library.opcheck(torch.ops.exmyconv.experts.default,
                          (x, index, weights, *experts._packed_buffers(), experts._handle))


def test_compiled_experts_are_one_graph_and_equal_eager(rng):
    """fullgraph=True: the experts compile into the graph as the custom op (before: a graph break at
    the host read of the routing), with the eager module's values bit for bit."""
    torch._dynamo.reset()
    model = _Routed(_small_experts(rng))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        for tokens in (1, 3, 7):
            x = torch.from_numpy(rng.standard_normal((tokens, model.experts.hidden_dim)).astype(np.float32))
            got = compiled(x)
            assert not torch.isnan(got).any() and torch.equal(got, model(x))
    # an input that needs gradients runs the untraced forward (the op has no backward): still correct
    torch._dynamo.reset()
    x = torch.from_numpy(rng.standard_normal((3, model.experts.hidden_dim)).astype(np.float32)).requires_grad_()
    y = torch.compile(model, backend="eager")(x)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and torch.equal(y, model(x))


def test_experts_op_uses_the_tensors_it_is_given(rng):
    """A copy gets its own handle; buffers passed to the op that are not the module's own are what it computes with."""
    import copy
    import pickle

    experts = _small_experts(rng)
    clone, unpickled = copy.deepcopy(experts), pickle.loads(pickle.dumps(experts))
    assert len({experts._handle, clone._handle, unpickled._handle}) == 3
    clone.down_proj_scale.mul_(2)
    x = torch.from_numpy(rng.standard_normal((3, experts.hidden_dim)).astype(np.float32))
    weights, index = torch.softmax(torch.randn(3, experts.num_experts), -1).topk(2)
    op = torch.ops.exmyconv.experts
    assert torch.equal(op(x, index, weights, *clone._packed_buffers(), experts._handle), clone(x, index, weights))
    assert torch.equal(op(x, index, weights, *experts._packed_buffers(), experts._handle), experts(x, index, weights))
    assert not torch.equal(clone(x, index, weights), experts(x, index, weights))


@pytest.mark.parametrize("conversion", ["e2m2"])
def test_compiled_moe_model_is_one_graph(converted, conversion):
    """The converted MoE model compiles whole (fullgraph=True) and gives the eager logits bitwise."""
    arch, source, folders = converted
    quantized = AutoModelForCausalLM.from_pretrained(folders[conversion][0], dtype=torch.float32)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    compiled = torch.compile(quantized, fullgraph=True, backend="eager")
    with torch.no_grad():
        got, want = compiled(input_ids=ids).logits, quantized(input_ids=ids).logits
    assert not torch.isnan(got).any() and torch.equal(got, want)


def test_experts_over_tensors_an_engine_owns(rng):
    """ExmyExperts.over computes with the given tensors in place (what the vLLM method holds) and refuses
    tensors of another layout."""
    from exmyconv.torch.experts import PACKED_BUFFERS

    own = _small_experts(rng)
    tensors = {name: own._buffers[name].clone() for name in PACKED_BUFFERS}
    engine = ExmyExperts.over(own.weights["gate_up_proj"], own.weights["down_proj"], torch.nn.SiLU(), tensors,
                              torch.float32)
    assert all(engine._buffers[name] is tensors[name] for name in PACKED_BUFFERS)
    x = torch.randn(6, 96)
    weights, index = torch.softmax(torch.randn(6, 5), -1).topk(2, dim=-1)
    assert torch.equal(engine(x, index, weights), own(x, index, weights))
    tensors["down_proj_scale"] = tensors["down_proj_scale"].float()
    with pytest.raises(exmyconv.ExmyError, match="down_proj_scale must be"):
        ExmyExperts.over(own.weights["gate_up_proj"], own.weights["down_proj"], torch.nn.SiLU(), tensors, torch.float32)
