"""Sibling layers computed as one (exmyconv.torch.siblings): q/k/v and gate/up as one layer of all their rows.

Reference: the same layers before grouping. On the CPU the group's one F.linear over more rows may sum
in another order than three small ones, so values are compared to float32 rounding; what must hold
exactly is the count of computations (one per group and input) and that every member's columns are
its own rows'.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import exmyconv  # noqa: E402
from exmyconv.format.exmy import get_format  # noqa: E402
from exmyconv.format.quant import quantize  # noqa: E402
from exmyconv.torch import siblings  # noqa: E402
from exmyconv.torch.linear import ExmyLinear  # noqa: E402
from exmyconv.torch.siblings import SiblingGroup, fuse_siblings  # noqa: E402

K = 192


def layer(n: int, seed: int, bias: bool = False, fmt: str = "e2m2", group: int | None = 64) -> ExmyLinear:
    rng = np.random.default_rng(seed)
    qt = quantize(rng.standard_normal((n, K)).astype(np.float32), get_format(fmt), group)
    m = ExmyLinear(K, n, fmt, group, bias=bias, scale_dtype=torch.float16)
    m.weight_packed.copy_(torch.from_numpy(qt.payload))
    m.weight_scale.copy_(torch.from_numpy(qt.scales))
    if bias:
        m.bias.data = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    return m


class Attention(torch.nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = layer(40, 1, bias), layer(24, 2, bias), layer(24, 3, bias)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def count_computes(monkeypatch) -> list:
    """Every ExmyLinear._forward call (a member alone, or a group's layer of all the rows): its rows."""
    seen, forward = [], ExmyLinear._forward

    def counted(self, x):
        seen.append(self.out_features)
        return forward(self, x)

    monkeypatch.setattr(ExmyLinear, "_forward", counted)
    return seen


def close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5) and not a.isnan().any()


@pytest.mark.parametrize("bias", [False, True])
def test_group_computes_once_and_gives_each_member_its_rows(monkeypatch, bias):
    att = Attention(bias)
    x = torch.randn(3, 5, K)
    with torch.no_grad():
        alone = att(x)
        SiblingGroup([att.q_proj, att.k_proj, att.v_proj])
        seen = count_computes(monkeypatch)
        grouped = att(x)
    assert seen == [88]  # one layer of 40 + 24 + 24 rows
    assert all(close(g, a) for g, a in zip(grouped, alone))
    group = att.q_proj._siblings[0]
    assert group.pending is None  # released after the last member
    # the members' buffers are row views of the whole: no second copy of the weights
    whole = group.fused.weight_packed
    assert att.k_proj.weight_packed.data_ptr() == whole.data_ptr() + 40 * whole.stride(0)
    assert att.v_proj.weight_scale.untyped_storage().data_ptr() == group.fused.weight_scale.untyped_storage().data_ptr()
    assert torch.equal(att.k_proj.dequantize_weight(torch.float32), layer(24, 2).dequantize_weight(torch.float32))


def test_other_inputs_dissolve_the_group(monkeypatch):
    """Cross-attention calls q with one input and k/v with another; a member called twice before the
    others is the same thing: the group dissolves and every member computes alone, correctly."""
    att = Attention()
    x, enc = torch.randn(2, K), torch.randn(4, K)
    with torch.no_grad():
        ref = (att.q_proj(x), att.k_proj(enc), att.v_proj(enc))
        SiblingGroup([att.q_proj, att.k_proj, att.v_proj])
        seen = count_computes(monkeypatch)
        got = (att.q_proj(x), att.k_proj(enc), att.v_proj(enc))
    assert seen == [88, 24, 24] and att.k_proj._siblings is None and att.q_proj._siblings is None
    assert all(close(g, r) for g, r in zip(got, ref))

    att = Attention()
    with torch.no_grad():
        SiblingGroup([att.q_proj, att.k_proj, att.v_proj])
        a = att.q_proj(x)
        b = att.q_proj(x)  # twice: dissolves, then computes alone
        x.add_(1)  # an input changed in place after the group's first call is not reused either
    assert close(a, b) and att.q_proj._siblings is None

    att = Attention()
    with torch.no_grad():
        SiblingGroup([att.q_proj, att.k_proj, att.v_proj])
        q = att.q_proj(x)
        x.mul_(2)
        k = att.k_proj(x)
    assert att.k_proj._siblings is None and close(k, layer(24, 2)(x)) and close(q, layer(40, 1)(x / 2))


def test_moving_a_member_dissolves_the_group():
    att = Attention()
    SiblingGroup([att.q_proj, att.k_proj, att.v_proj])
    att.to(torch.float64)
    assert all(m._siblings is None for m in (att.q_proj, att.k_proj, att.v_proj))
    x = torch.randn(2, K, dtype=torch.float64)
    with torch.no_grad():
        assert close(att.k_proj(x), layer(24, 2).to(torch.float64)(x))


def test_gradients_take_each_members_own_op(monkeypatch):
    att = Attention(bias=True)
    SiblingGroup([att.q_proj, att.k_proj, att.v_proj])
    seen = count_computes(monkeypatch)
    x = torch.randn(3, K, requires_grad=True)
    sum(y.square().sum() for y in att(x)).backward()
    assert seen == [40, 24, 24] and att.q_proj._siblings is not None  # the op's, one per member
    x2 = x.detach().clone().requires_grad_()
    plain = Attention(bias=True)
    sum(torch.nn.functional.linear(x2, m.dequantize_weight(torch.float32), m.bias).square().sum()
        for m in (plain.q_proj, plain.k_proj, plain.v_proj)).backward()
    assert close(x.grad, x2.grad)


def test_compiled_group_is_one_op(monkeypatch):
    """fullgraph: the group's Python traces into one exmyconv::linear_siblings node per input."""
    torch._dynamo.reset()
    att = Attention(bias=True)
    x = torch.randn(2, 3, K)
    with torch.no_grad():
        ref = att(x)
        SiblingGroup([att.q_proj, att.k_proj, att.v_proj])
        compiled = torch.compile(att, fullgraph=True, backend="aot_eager")
        compiled(x)
        seen = count_computes(monkeypatch)
        got = compiled(x)
    assert seen == [88] and att.q_proj._siblings[0].pending is None
    assert all(close(g, r) for g, r in zip(got, ref))


def test_siblings_op_passes_opcheck():
    att = Attention()
    group = SiblingGroup([att.q_proj, att.k_proj, att.v_proj])
    members = group.members
    args = (torch.randn(3, K), [m.weight_packed for m in members], [m.weight_scale for m in members], group._handle)
    torch.library.opcheck(torch.ops.exmyconv.linear_siblings.default, args)
    # tensors that are not the group's own buffers are computed from as given
    other = [layer(40, 9), layer(8, 10)]
    y = torch.ops.exmyconv.linear_siblings(args[0], [m.weight_packed for m in other],
                                           [m.weight_scale for m in other], group._handle)
    assert close(y, torch.cat([m(args[0]) for m in other], -1))


def test_copies_group_their_own_buffers():
    att = Attention()
    SiblingGroup([att.q_proj, att.k_proj, att.v_proj])
    clone = copy.deepcopy(att)
    group, cloned = att.q_proj._siblings[0], clone.q_proj._siblings[0]
    assert cloned is not group and cloned._handle != group._handle and cloned.members[1] is clone.k_proj
    clone.k_proj.weight_scale.mul_(2)  # the copy's own (shared) buffers
    assert cloned.fused.weight_scale[40:64].equal(clone.k_proj.weight_scale)
    x = torch.randn(2, K)
    with torch.no_grad():
        assert close(clone(x)[1], 2 * att(x)[1]) and close(clone(x)[0], att(x)[0])


def test_fuse_siblings_takes_compatible_cuda_groups(monkeypatch, tmp_path):
    """from_pretrained groups q/k/v and gate/up of every layer (here the CPU counts as the GPU would):
    generate() gives the unfused model's tokens, with 4 computations per layer instead of 7."""
    cfg = transformers.LlamaConfig(hidden_size=K, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "src")
    exmyconv.quantize(str(tmp_path / "src"), str(tmp_path / "q"), format="e2m2")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert not any(m._siblings for m in plain.modules() if isinstance(m, ExmyLinear))  # CPU: not grouped
    monkeypatch.setattr(siblings, "DEVICES", ("cpu",))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    groups = {id(m._siblings[0]) for m in model.modules() if isinstance(m, ExmyLinear) and m._siblings}
    assert len(groups) == 2 * cfg.num_hidden_layers
    assert fuse_siblings(model) == 0  # grouped once
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    with torch.no_grad():
        assert close(model(ids).logits, plain(ids).logits)
        ref = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        seen = count_computes(monkeypatch)
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(got, ref)
    assert len(seen) == 6 * 4 * cfg.num_hidden_layers  # 6 forward calls; lm_head is tied (not quantized)


def test_incompatible_siblings_stay_apart(monkeypatch):
    monkeypatch.setattr(siblings, "DEVICES", ("cpu",))
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = layer(16, 1), layer(16, 2, group=None)  # group sizes differ
            self.query, self.key, self.value = layer(8, 3), layer(8, 4), torch.nn.Linear(K, 8)

    model = Mixed()
    assert siblings.fusible([model.query, model.key])
    assert not siblings.fusible([model.gate_proj, model.up_proj])
    assert not siblings.fusible([model.query, model.key, model.value])
    assert fuse_siblings(model) == 0
