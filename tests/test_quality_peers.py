"""exmyconv.bench.peers_quality: the peers of `bench --quality` (NF4, HQQ, GPTQ).

Oracles: NF4's table recomputed from its definition (normal quantiles), bitsandbytes itself where it
imports, a brute-force nearest-value NF4, RTN (GPTQ with an identity Hessian must equal it; with
correlated inputs it must beat it on the Hessian-weighted error), hqq's own dequantization.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")

import exmyconv  # noqa: E402
from exmyconv.bench import compare, peers_quality  # noqa: E402
from exmyconv.bench.baselines import IntScheme  # noqa: E402
from exmyconv.bench.peers_quality import NF4, Peer  # noqa: E402
from exmyconv.convert.calibration import layer_input_statistics  # noqa: E402


def _bnb():
    try:
        import bitsandbytes.functional as bnbf
    except Exception:
        pytest.skip("bitsandbytes is not importable (pip install bitsandbytes)")
    return bnbf


def _weights(rng, shape):
    """Gaussian weights with row scales spread over two decades and a few outliers."""
    w = rng.standard_normal(shape) * rng.uniform(0.002, 0.2, (shape[0], 1))
    w.flat[rng.integers(0, w.size, max(1, w.size // 500))] *= 8
    return w.astype(np.float32)


# --------------------------------------------------------------------------- NF4


def test_nf4_table_is_the_normal_quantiles():
    """QLoRA's NF4: 8 positive and 7 negative N(0,1) quantiles between p = 0.5 and 0.9677083, and 0,
    scaled to [-1, 1]."""
    offset = 0.9677083
    ndtri = lambda p: torch.special.ndtri(torch.tensor(p, dtype=torch.float64)).numpy()  # noqa: E731
    positive = ndtri(np.linspace(offset, 0.5, 9)[:-1])
    negative = -ndtri(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([negative, [0.0], positive])) / positive.max()
    np.testing.assert_allclose(NF4, values, atol=2e-7)
    assert NF4[0] == -1 and NF4[-1] == 1 and NF4[7] == 0 and np.all(np.diff(NF4) > 0)


def test_dynamic_map_shape():
    dmap = peers_quality.dynamic_map()
    assert dmap.shape == (256,) and np.all(np.diff(dmap) > 0) and dmap[-1] == 1 and 0 in dmap
    inner = dmap[(dmap != 0) & (dmap != 1)]
    np.testing.assert_array_equal(np.sort(-inner), inner)  # symmetric apart from 0 and 1
    assert np.isclose(np.abs(inner).min(), 0.55e-6, rtol=1e-6)  # mid of [0.1, 1] times 1e-6


def _nf4_brute_force(w):
    """Nearest table entries by exhaustive search. The values are scaled as bitsandbytes scales them
    (float32, times the reciprocal of the block's absmax), so that near-ties fall the same way."""
    flat = w.reshape(-1)
    blocks = -(-flat.size // 64)
    padded = np.pad(flat, (0, blocks * 64 - flat.size)).reshape(blocks, 64)
    absmax = np.abs(padded).max(1)
    offset = np.float32(absmax.astype(np.float64).mean())
    centered = absmax - offset
    dmap = peers_quality.dynamic_map()
    nested_blocks = -(-blocks // 256)
    nested = np.abs(np.pad(centered, (0, nested_blocks * 256 - blocks))).reshape(-1, 256).max(1)
    nested_each = np.repeat(nested, 256)[:blocks]
    scaled2 = np.clip(centered * (np.float32(1) / nested_each), -1, 1).astype(np.float64)
    codes2 = np.abs(scaled2[:, None] - dmap[None].astype(np.float64)).argmin(1)
    absmax_hat = dmap[codes2].astype(np.float64) * nested_each + offset
    scaled = np.clip(padded * (np.float32(1) / absmax)[:, None], -1, 1).reshape(-1)[:flat.size].astype(np.float64)
    codes = np.abs(scaled[:, None] - NF4[None].astype(np.float64)).argmin(1)
    return (NF4[codes] * np.repeat(absmax_hat, 64)[:flat.size]).reshape(w.shape)


@pytest.mark.parametrize("shape", [(48, 64), (96, 576), (5, 77)])  # 3 blocks; 864 (> 256) blocks; a short last block
def test_nf4_matches_brute_force(rng, shape):
    w = _weights(rng, shape)
    ours = peers_quality.nf4_fake_quantize(w)
    assert ours.shape == w.shape and ours.dtype == np.float32 and np.isfinite(ours).all()
    oracle = _nf4_brute_force(w)
    # ours dequantizes the absmax (code * nested + offset) in float32: within an ulp of the offset
    np.testing.assert_allclose(ours, oracle, rtol=2e-6, atol=2e-7 * np.abs(w).max())
    err = np.linalg.norm(ours - w) / np.linalg.norm(w)
    assert 0.02 < err < 0.2


def test_nf4_zero_and_constant_tensors():
    assert np.all(peers_quality.nf4_fake_quantize(np.zeros((4, 128), np.float32)) == 0)
    w = np.full((2, 64), 0.5, np.float32)
    np.testing.assert_allclose(peers_quality.nf4_fake_quantize(w), w, rtol=1e-6)


def test_nf4_bits():
    per_weight = 4 + 8 / 64 + 32 / (64 * 256)  # codes, 8-bit absmax, fp32 absmax per 256 blocks
    n = 4096 * 4096
    assert peers_quality.nf4_bits(n, tables=False) == n * per_weight + 32  # + the fp32 offset
    assert peers_quality.nf4_bits(n) - peers_quality.nf4_bits(n, tables=False) == 32 * (16 + 256)
    assert peers_quality.nf4_bits(65) == 8 * 33 + 8 * 2 + 32 * 2 + 32 * 272  # odd count: a padding nibble


@pytest.mark.parametrize("shape", [(64, 384), (40, 576), (3, 100)])
def test_nf4_against_bitsandbytes(rng, shape):
    bnbf = _bnb()
    w = _weights(rng, shape)
    packed, state = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = bnbf.dequantize_4bit(packed, state).numpy()
    np.testing.assert_array_equal(state.code.numpy(), NF4)
    np.testing.assert_allclose(state.state2.code.numpy(), peers_quality.dynamic_map(), atol=1e-7)
    ours = peers_quality.nf4_fake_quantize(w)
    # bitsandbytes' C code rounds the 8-bit absmax codes of near-ties the other way now and then
    # (a neighbouring code, measured: ~0.2 % of blocks): such a block scales by one ratio, nothing else differs
    blocks = -(-w.size // 64)
    pad = blocks * 64 - w.size
    a = np.pad(ours.reshape(-1), (0, pad)).reshape(blocks, 64)
    b = np.pad(theirs.reshape(-1), (0, pad)).reshape(blocks, 64)
    differ = ~np.all(np.isclose(a, b, rtol=2e-6, atol=2e-7 * np.abs(w).max()), axis=1)  # else rounding order only
    assert differ.sum() <= max(1, 0.02 * blocks), differ.mean()
    for x, y in zip(a[differ], b[differ]):  # the same NF4 codes, another block scale
        assert np.array_equal(x == 0, y == 0)
        ratio = x[y != 0] / y[y != 0]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    # bits: what bitsandbytes serializes (its tensors, plus the offset it keeps in the JSON blob)
    stored = sum(t.numel() * t.element_size() * 8 for key, t in state.as_dict(packed=True).items()
                 if not key.startswith("quant_state."))
    assert stored + packed.numel() * 8 + 32 == peers_quality.nf4_bits(w.size)


# --------------------------------------------------------------------------- HQQ


@pytest.mark.parametrize("group", [64, 128])
def test_hqq_against_its_own_dequantization(rng, group):
    pytest.importorskip("hqq.core.quantize")
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    w = _weights(rng, (64, 384))
    ours, bits = peers_quality.hqq_fake_quantize(w, group)
    assert bits == w.size * (4 + 32 / group)
    packed, meta = Quantizer.quantize(torch.from_numpy(w), **BaseQuantizeConfig(nbits=4, group_size=group)
                                      ["weight_quant_params"], compute_dtype=torch.float16, device="cpu")
    theirs = Quantizer.dequantize(packed, {**meta, "compute_dtype": torch.float32}).numpy()
    # ours uses the fp16 scale and zero HQQLinear keeps: within fp16 rounding of theirs
    np.testing.assert_allclose(ours, theirs, atol=4e-3 * np.abs(w).max(axis=1, keepdims=True).max())
    assert 0.02 < np.linalg.norm(ours - w) / np.linalg.norm(w) < 0.15


# --------------------------------------------------------------------------- GPTQ


def _correlated_hessian(rng, k, samples=2048):
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = rng.standard_normal((samples, k)) @ mix * rng.uniform(0.1, 3.0, k)
    return 2 * x.T @ x / samples


def _h_error(w, q, h):
    d = (w - q).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", d, h, d))


@pytest.mark.parametrize("k, group", [(256, 128), (320, 128), (192, 64)])
def test_gptq_beats_rtn_on_correlated_inputs(rng, k, group):
    w = _weights(rng, (48, k))
    h = _correlated_hessian(rng, k)
    scheme = IntScheme(4, group)
    out = peers_quality.gptq(w, h, scheme)
    assert out.shape == w.shape and out.dtype == np.float32 and np.isfinite(out).all()
    rtn = scheme.fake_quantize(w)
    assert _h_error(w, out, h) < 0.8 * _h_error(w, rtn, h)
    # every value lies on its group's 16-level grid: per row, at most 16 distinct values per group
    order = np.argsort(-np.diag(h), kind="stable")
    for start in range(0, k, group):
        cols = order[start:start + group]
        assert max(len(np.unique(row)) for row in out[:, cols]) <= 16


def test_gptq_identity_hessian_is_rtn(rng):
    w = _weights(rng, (32, 384))
    for act_order in (True, False):
        out = peers_quality.gptq(w, np.eye(384) * rng.uniform(0.5, 2), IntScheme(4, 128), act_order=act_order)
        np.testing.assert_array_equal(out, IntScheme(4, 128).fake_quantize(w))


def test_gptq_dead_inputs_give_zero_weights(rng):
    w = _weights(rng, (16, 128))
    h = _correlated_hessian(rng, 128)
    h[:, 5] = h[5, :] = 0
    out = peers_quality.gptq(w, h, IntScheme(4, 128))
    assert np.all(out[:, 5] == 0) and np.isfinite(out).all()


def test_gptq_bits():
    # 4-bit codes, per group fp16 scale + 4-bit zero, int32 g_idx per column
    assert peers_quality.gptq_bits((4096, 4096), IntScheme(4, 128)) == 4096 * 4096 * 4 + 4096 * 32 * 20 + 32 * 4096
    assert peers_quality.gptq_bits((1536, 576), IntScheme(4, 128)) == 1536 * 576 * 4 + 1536 * 5 * 20 + 32 * 576


def test_layer_input_statistics_of_a_linear(rng):
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 8))
    windows = [torch.tensor(rng.integers(0, 50, n)) for n in (7, 5)]

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, input_ids):
            return self.net(input_ids)

    h = layer_input_statistics(Wrapped(), windows, full=True, names=["net.1.weight"])["net.1.weight"]
    x = torch.cat([model[0](w) for w in windows]).detach().double().numpy()
    np.testing.assert_allclose(h, x.T @ x / 12, rtol=1e-6)  # float32 of float64 sums
    diag = layer_input_statistics(Wrapped(), windows, full=False)["net.1.weight"]
    np.testing.assert_allclose(diag, np.square(x).mean(0), rtol=1e-5)
    with pytest.raises(exmyconv.ExmyError, match="nn.Linear"):
        layer_input_statistics(Wrapped(), windows, full=True, names=["net.0.weight"])


# --------------------------------------------------------------------------- names and bench rows


def test_parse_names():
    assert peers_quality.parse("nf4-b64") == Peer("nf4", 64)
    assert peers_quality.parse("HQQ4-G128") == Peer("hqq4", 128) and Peer("hqq4", 128).name == "hqq4-g128"
    assert peers_quality.parse("gptq4-g128").needs_calibration
    assert peers_quality.parse("e2m2") is None and peers_quality.parse("int4-g128") is None
    with pytest.raises(exmyconv.ExmyError, match="nf4-b64"):
        peers_quality.parse("nf4-b32")
    with pytest.raises(exmyconv.ExmyError, match="calibration"):
        compare.parse_variants("gptq4-g128", None)
    names = [v.name for v in compare.parse_variants(None, "cal.txt")]
    assert "nf4-b64" in names and "gptq4-g128" in names and names[-1] == "auto-5+cal"
    assert "gptq4-g128" not in [v.name for v in compare.parse_variants(None, None)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama with random weights (K = 128, 256) and a byte-level BPE tokenizer, plus a calibration text."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from test_eval import save_tiny_llama

    root = tmp_path_factory.mktemp("peers")
    save_tiny_llama(root / "src", 300, 128, seed=1)
    calibration = root / "cal.txt"
    calibration.write_text("A calibration text, other than the measured one, about rivers, trains and bread. " * 20)
    return root / "src", calibration


def test_bench_quality_peer_rows(run_cli, tiny_llama, tmp_path):
    source, calibration = tiny_llama
    out_json = tmp_path / "q.json"
    code, out, err = run_cli("bench", "--quality", "--checkpoint", source, "--formats", "int4-g128,nf4-b64,gptq4-g128",
                             "--calibration", calibration, "--tokens", 150, "--seq-len", 64, "--json", out_json,
                             "--png", tmp_path / "q.png")
    assert code == 0, err
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert list(rows) == ["int4-g128", "nf4-b64", "gptq4-g128"]
    # 14 tensors of K = 128 (12) and 256 (2); NF4 adds its code tables per tensor to the nominal bits
    shapes = compare.quantized_shapes(source)
    weights = sum(int(np.prod(s)) for s in shapes.values())
    assert rows["nf4-b64"]["bits"] == pytest.approx(
        sum(peers_quality.nf4_bits(int(np.prod(s))) for s in shapes.values()) / weights)
    assert 4.12 < rows["nf4-b64"]["bits_nominal"] < 4.2 < rows["nf4-b64"]["bits"]  # small tensors: the tables weigh
    assert rows["gptq4-g128"]["bits"] == pytest.approx(
        sum(peers_quality.gptq_bits(s, IntScheme(4, 128)) for s in shapes.values()) / weights)
    for r in rows.values():
        assert r["kl_mean"] > 0 and 0 < r["top1_agreement"] <= 1 and 0.01 < r["rel_weight_error"] < 0.3
    assert "gptq4-g128: exmyconv's GPTQ" in out and "nf4-b64:" in out


def test_bench_quality_missing_peer_is_a_row(monkeypatch, run_cli, tiny_llama, tmp_path):
    source, _ = tiny_llama
    monkeypatch.setattr(Peer, "unavailable", lambda self: "hqq is not importable (test)")
    out_json = tmp_path / "q.json"
    code, out, err = run_cli("bench", "--quality", "--checkpoint", source, "--formats", "int4-g128,hqq4-g64",
                             "--tokens", 100, "--seq-len", 64, "--json", out_json, "--png", tmp_path / "q.png")
    assert code == 0, err
    rows = {r["variant"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert rows["hqq4-g64"] == {"variant": "hqq4-g64", "refused": "hqq is not importable (test)"}
    assert "bits" in rows["int4-g128"]
