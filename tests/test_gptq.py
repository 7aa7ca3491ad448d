"""--rounding gptq (convert/gptq.py): error-compensating rounding on ExMy grids.

Oracles: the proxy loss tr(ΔW H ΔWᵀ) computed here in float64; an unblocked, column-by-column
GPTQ written here from the paper's update rule (no lazy blocks); the independent layout reader
tests/spec_decoder.py for the packed output; the Hessian from the model's hidden states.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import spec_decoder as spec
from conftest import cli_call
from test_search import minilm_dir  # noqa: F401 (fixture: the MiniLM folder)
from exmyconv.convert.gptq import DAMP, gptq_rows, inverse_factor
from exmyconv.format.exmy import get_format
from exmyconv.format.pack import pack_codes
from exmyconv.format.quant import choose_scale_dtype, dequantize_codes, group_amax, groups_of, quantize_rows

CASES = [("e2m2", None), ("e2m1", None), ("e2m2s4", None), ("e2m2", 64), ("e2m1", 128), ("e2m2s4", 128),
         ("e2m3s3", 100)]  # the last: share blocks straddle scale groups, a short last group
IDS = [f"{f}-g{g}" if g else f for f, g in CASES]


def correlated_hessian(rng, k: int, n: int | None = None) -> np.ndarray:
    """H = XᵀX/n of inputs with correlated channels of unequal energy (as LLM activations)."""
    n = n or 4 * k
    mix = np.eye(k) + rng.standard_normal((k, k)) * rng.uniform(0.02, 0.15)
    x = rng.standard_normal((n, k)) @ mix * rng.lognormal(0, 1, k)
    return (x.T @ x / n).astype(np.float32)


def proxy_loss(w, codes, scales, fmt, g, h) -> float:
    d = (dequantize_codes(codes, scales, fmt, g).astype(np.float64) - w)
    return float(np.einsum("ij,jk,ik->", d, h.astype(np.float64), d))


def setup(rng, name, group, rows=96, k=384):
    fmt = get_format(name)
    w = (rng.standard_normal((rows, k)) * rng.uniform(0.5, 2, (rows, 1))).astype(np.float32)
    g, ngroups = groups_of(k, group)
    return fmt, w, g, choose_scale_dtype(group_amax(w, g, ngroups), fmt)


def reference_gptq(w, fmt, g, scale_dtype, h):
    """Column by column, every error pushed at once onto all later columns (no blocks); a share
    block's bit per row by trying both. Scales when a group's first column's share block starts."""
    u = np.linalg.cholesky(np.linalg.inv(h.astype(np.float64) + DAMP * np.mean(np.diag(h)) * np.eye(len(h)))).T
    rows, k = w.shape
    w = w.astype(np.float64)
    codes = np.zeros((rows, k), np.uint8)
    scales = np.zeros((rows, -(-k // g)), np.float32)
    col_scale = np.zeros((rows, k))
    for start in range(0, k, fmt.share):
        stop = min(start + fmt.share, k)
        for c in range(start, stop):
            if c % g == 0:
                s = quantize_rows(w[:, c:c + g].astype(np.float32), fmt, min(g, k - c), scale_dtype)[1]
                scales[:, c // g] = s[:, 0]
                col_scale[:, c:c + g] = s
        best = None
        for bit in ((None,) if fmt.share == 1 else (0, 1)):
            trial, loss, got = w.copy(), np.zeros(rows), []
            for c in range(start, stop):
                y = (trial[:, c] / col_scale[:, c]).astype(np.float32)
                code = fmt.encode_nearest(y) if bit is None else fmt.nearest_with_last_bit(y, bit)
                e = (trial[:, c] - fmt.table[code] * col_scale[:, c]) / u[c, c]
                trial[:, c:] -= np.outer(e, u[c, c:])
                loss += e * e
                got.append(code)
            got = np.stack(got, 1)
            if best is None:
                best = (loss, got, trial)
            else:
                pick = loss < best[0]
                best = (np.where(pick, loss, best[0]), np.where(pick[:, None], got, best[1]),
                        np.where(pick[:, None], trial, best[2]))
        codes[:, start:stop] = best[1]
        w = best[2]
    return codes, scales


@pytest.mark.parametrize("name,group", CASES, ids=IDS)
def test_gptq_lowers_the_proxy_loss_and_packs_exactly(name, group, rng):
    fmt, w, g, sd = setup(rng, name, group)
    h = correlated_hessian(rng, w.shape[1])
    near_codes, near_scales = quantize_rows(w, fmt, g, sd)
    codes, scales = gptq_rows(w, fmt, g, sd, inverse_factor(h))
    near, comp = proxy_loss(w, near_codes, near_scales, fmt, g, h), proxy_loss(w, codes, scales, fmt, g, h)
    print(f"\n{name} g={g}: tr(dW H dW^T) nearest {near:.4g}, gptq {comp:.4g} ({comp / near:.3f}x)")
    assert np.isfinite(comp) and comp < 0.95 * near
    # the layout: codes survive packing (every share block has one last bit), decode to grid values
    e, m, k = spec.parse_format_full(name)
    packed = pack_codes(codes, fmt)
    assert np.array_equal(spec.unpack_codes(packed, w.shape[1], 1 + e + m, k), codes)
    values = spec.exmy_values(e, m)[codes] * np.repeat(scales, g, axis=1)[:, :w.shape[1]]
    assert np.array_equal(values, dequantize_codes(codes, scales, fmt, g))
    # valid scales, exact in the scale dtype
    assert sd == "F16" and np.array_equal(scales.astype(np.float16).astype(np.float32), scales)
    assert (scales >= 2.0**-14).all() and np.isfinite(scales).all()


@pytest.mark.parametrize("name,group", CASES, ids=IDS)
def test_blocked_matches_unblocked_reference(name, group, rng):
    fmt, w, g, sd = setup(rng, name, group, rows=24)
    h = correlated_hessian(rng, w.shape[1])
    codes, scales = gptq_rows(w, fmt, g, sd, inverse_factor(h))
    ref_codes, ref_scales = reference_gptq(w, fmt, g, sd, h)
    # the same algorithm up to float rounding order: a near-tie may flip, and the rest of its row follows
    same_rows = (codes == ref_codes).all(1) & (scales == ref_scales).all(1)
    assert same_rows.mean() >= 0.9, same_rows.mean()
    ratio = proxy_loss(w, codes, scales, fmt, g, h) / proxy_loss(w, ref_codes, ref_scales, fmt, g, h)
    assert abs(ratio - 1) < 0.01


@pytest.mark.parametrize("name,group", CASES, ids=IDS)
def test_diagonal_hessian_is_nearest_rounding(name, group, rng):
    """Nothing correlates, so nothing is pushed: nearest codes and scales (identity: exactly
    quantize_rows; another diagonal: quantize_rows weighing the shared bit by H's dampened diagonal)."""
    fmt, w, g, sd = setup(rng, name, group)
    k = w.shape[1]
    assert [np.array_equal(a, b) for a, b in zip(gptq_rows(w, fmt, g, sd, inverse_factor(np.eye(k))),
                                                  quantize_rows(w, fmt, g, sd))] == [True, True]
    diag = rng.lognormal(0, 1, k)
    importance = diag + DAMP * diag.mean()
    got = gptq_rows(w, fmt, g, sd, inverse_factor(np.diag(diag)))
    want = quantize_rows(w, fmt, g, sd, importance=importance)
    assert np.array_equal(got[1], want[1])
    assert (got[0] == want[0]).mean() > 0.999  # float sums in another order may break a near-tie


def test_deterministic_and_rows_independent(rng):
    fmt, w, g, sd = setup(rng, "e2m2s4", 64, rows=64)
    factor = inverse_factor(correlated_hessian(rng, w.shape[1]))
    codes, scales = gptq_rows(w, fmt, g, sd, factor)
    again = gptq_rows(w, fmt, g, sd, factor)
    halves = [gptq_rows(part, fmt, g, sd, factor) for part in (w[:40], w[40:])]  # the pipeline's row chunks
    assert np.array_equal(codes, again[0]) and np.array_equal(scales, again[1])
    assert np.array_equal(codes, np.concatenate([c for c, _ in halves]))


def test_dead_channels_and_singular_hessian(rng):
    """Channels never active (zero rows/columns of H) and a rank-deficient H still factor."""
    fmt, w, g, sd = setup(rng, "e2m2", None, rows=16, k=128)
    x = rng.standard_normal((32, 128)).astype(np.float32)  # 32 samples: rank 32
    x[:, :10] = 0
    h = x.T @ x / 32
    u = inverse_factor(h)
    assert np.isfinite(u).all() and np.allclose(u, np.triu(u)) and (np.diag(u) > 0).all()
    codes, scales = gptq_rows(w, fmt, g, sd, u)
    assert proxy_loss(w, codes, scales, fmt, g, h) < proxy_loss(w, *quantize_rows(w, fmt, g, sd), fmt, g, h)


# --------------------------------------------------------------------------- end to end on MiniLM

@pytest.fixture(scope="module")
def prose(tmp_path_factory):
    from test_search import PROSE

    path = tmp_path_factory.mktemp("gptq") / "prose.txt"
    path.write_text(PROSE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def calibrated(minilm_dir, prose):
    from exmyconv.convert.pipeline import Options, calibrate, plan
    from exmyconv.io.source import open_source

    opts = Options(format="e2m2s4", calibration=str(prose), rounding="gptq")
    source = open_source(str(minilm_dir))
    try:
        items = plan(source, opts)
        calibrate(source, items, opts)
    finally:
        source.close()
    return {item.info.name: item for item in items if item.record}


@pytest.fixture(scope="module")
def hessians(calibrated):
    return {name: item.hessian for name, item in calibrated.items()}


def test_calibrate_gives_one_hessian_per_input(calibrated):
    """q/k/v (one input) share one matrix, so one inverse-Hessian factor; the importance is its diagonal."""
    for i in range(6):
        attn = f"encoder.layer.{i}.attention"
        q = calibrated[f"{attn}.self.query.weight"].hessian
        assert q.shape == (384, 384) and q.dtype == np.float32 and np.isfinite(q).all()
        assert calibrated[f"{attn}.self.key.weight"].hessian is q and calibrated[f"{attn}.self.value.weight"].hessian is q
        assert calibrated[f"{attn}.output.dense.weight"].hessian is not q
        assert np.allclose(q, q.T) and (np.diagonal(q) > 0).all()
    assert calibrated["encoder.layer.0.output.dense.weight"].hessian.shape == (1536, 1536)
    assert len({id(item.hessian) for item in calibrated.values()}) == 6 * 4 + 1  # qkv, attn out, ffn in/out; pooler
    for item in calibrated.values():
        assert np.array_equal(item.importance, np.diagonal(item.hessian))


def test_hessians_are_the_inputs_second_moments(minilm_dir, hessians):
    """Oracle: layer i's query/key/value input is hidden_states[i] (transformers' own output)."""
    import torch
    import transformers

    from test_search import PROSE

    model = transformers.AutoModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    ids = tok(PROSE, add_special_tokens=False, return_tensors="pt")["input_ids"][0][:4096]
    sums, count = 0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 512):
            hs = model(input_ids=ids[start:start + 512][None], output_hidden_states=True).hidden_states
            sums = sums + torch.stack([h[0].double().T @ h[0].double() for h in hs[:-1]])
            count += hs[0].shape[1]
    for i in range(6):
        want = (sums[i] / count).numpy()
        got = hessians[f"encoder.layer.{i}.attention.self.query.weight"]
        assert np.allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_cli_gptq_beats_nearest_on_the_calibration_loss(minilm_dir, prose, hessians, tmp_path):
    outs = {}
    for rounding in ("nearest", "gptq"):
        outs[rounding] = tmp_path / rounding
        extra = ("--rounding", "gptq") if rounding == "gptq" else ()  # nearest: the default
        code, _, err = cli_call("quantize", "@minilm", outs[rounding], "--format", "e2m2s4", "--calibration", prose,
                                *extra, "--no-verify")
        assert code == 0, err
    config = json.loads((outs["gptq"] / "config.json").read_text())["quantization_config"]
    assert "--rounding gptq" in config["command"] and config["format"] == "e2m2s4"
    assert "--rounding" not in json.loads((outs["nearest"] / "config.json").read_text())["quantization_config"]["command"]
    ckpts = {r: spec.read_checkpoint(str(o)) for r, o in outs.items()}
    import transformers

    source = transformers.AutoModel.from_pretrained(str(minilm_dir), local_files_only=True).state_dict()
    assert set(ckpts["gptq"].quantized) == set(ckpts["nearest"].quantized) == {n for n in hessians if n in source}
    ratios = []
    for name, q in ckpts["gptq"].quantized.items():
        w = source[name].double().numpy()
        h = hessians[name].astype(np.float64)
        losses = []
        for r in ("nearest", "gptq"):
            d = ckpts[r].quantized[name].dequantize().astype(np.float64) - w
            losses.append(np.einsum("ij,jk,ik->", d, h, d))
        ratios.append(losses[1] / losses[0])
    print(f"\nMiniLM e2m2s4: gptq/nearest proxy loss per tensor: median {np.median(ratios):.3f}, "
          f"worst {max(ratios):.3f}")
    assert max(ratios) < 1 and np.median(ratios) < 0.8


def test_cli_gptq_needs_calibration(tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli_call("quantize", "@minilm", out, "--rounding", "gptq", "--no-verify")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "--calibration" in lines[0], err
    assert "Traceback" not in err + stdout and not out.exists()


# --------------------------------------------------------------------------- torch: the same codes

TORCH_CASES = CASES + [("e2m1", 32), ("e2m2s4", 64), ("e2m3s3", None)]  # K = 400 below: 64 does not divide it


def torch_case(rng, name, group, rows=80, k=400):
    fmt, w, g, sd = setup(rng, name, group, rows, k)
    w[3] = 0  # a zero row: codes with the sign of zero
    h = correlated_hessian(rng, k).astype(np.float64)
    h[7, :] = h[:, 7] = 0  # a channel never active
    importance = np.diagonal(h).astype(np.float32)
    return fmt, w, g, sd, inverse_factor(h), importance


@pytest.mark.parametrize("clip", [False, True], ids=["absmax", "clip"])
@pytest.mark.parametrize("name,group", TORCH_CASES, ids=[f"{f}-g{g}" if g else f for f, g in TORCH_CASES])
def test_torch_cpu_gives_the_numpy_codes_and_scales(name, group, clip, rng):
    """convert/gptq_torch.py on the CPU: bit for bit convert/gptq.py's output (oracle: the numpy path)."""
    torch = pytest.importorskip("torch")
    from exmyconv.convert import gptq_torch

    fmt, w, g, sd, factor, importance = torch_case(rng, name, group)
    want = gptq_rows(w, fmt, g, sd, factor, clip, importance)
    got = gptq_torch.gptq_rows(w, fmt, g, sd, factor, clip, importance, torch.device("cpu"))
    assert got[0].dtype == np.uint8 and got[1].dtype == np.float32 and np.isfinite(got[1]).all()
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    near = quantize_rows(w, fmt, g, sd, clip, importance)[0]
    assert (got[0] != near).mean() > 0.05  # errors were pushed: the comparison is not that of nearest rounding


def test_products_are_exact_in_any_order(rng):
    """The updates through matrix products cannot depend on a BLAS's summation order: the factor's and
    each error row's bits are cut so that every product and partial sum is exact (oracle: Fractions)."""
    from fractions import Fraction

    from exmyconv.convert.gptq import BLOCK, NUMPY, _product

    factor = inverse_factor(correlated_hessian(rng, BLOCK + 40))
    err = rng.standard_normal((6, BLOCK)) * rng.lognormal(0, 3, (6, 1))
    err[2] = 0
    err[4, ::2] *= 1e-9  # small and large errors in one row
    got = _product(NUMPY, err, factor[:BLOCK, BLOCK:])
    rounded = _product(NUMPY, err, np.eye(BLOCK))  # the rounded errors themselves (exact: identity)
    for r in (0, 2, 4):
        for c in (0, 17, 39):
            exact = sum(Fraction(float(rounded[r, i])) * Fraction(float(factor[i, BLOCK + c])) for i in range(BLOCK))
            assert Fraction(float(got[r, c])) == exact
    assert (np.abs(rounded - err).max(1) <= np.abs(err).max(1) * 2.0**-21).all()  # each row to 21 bits


# --------------------------------------------------------------------------- --format auto --rounding gptq

AUTO = ("--format", "auto", "--bits", "4.5", "--candidates", "e2m1,e2m2s4,e2m2")


@pytest.fixture(scope="module")
def auto_gptq(minilm_dir, prose, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto-gptq") / "out"
    code, _, err = cli_call("quantize", "@minilm", out, *AUTO, "--calibration", prose, "--rounding", "gptq",
                            "--no-verify")
    assert code == 0, err
    return out


def proxy_losses(ckpt, source, hessians) -> dict[str, float]:
    """Per quantized tensor of a checkpoint (read by the independent decoder): tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)."""
    out = {}
    for name, q in ckpt.quantized.items():
        w = source[name].double().numpy()
        h = hessians[name].astype(np.float64)
        d = q.dequantize().astype(np.float64) - w
        out[name] = np.einsum("ij,jk,ik->", d, h, d) / np.einsum("ij,jk,ik->", w, h, w)
    return out


def test_auto_gptq_measures_nearest_and_writes_gptq(minilm_dir, auto_gptq, hessians):
    """`auto` with --rounding gptq allocates with nearest rounding's activation-weighted errors (they chose
    better than GPTQ's own, docs/quality.md) and says so; what it writes is GPTQ-rounded (its proxy
    loss below nearest rounding's of the same format; oracle: the independent decoder and H)."""
    import transformers

    report = json.loads((auto_gptq / "exmy_search.json").read_text())
    assert report["rounding"] == {"measured": "nearest", "written": "gptq"}
    assert report["objective"] == "activation-weighted relative MSE"
    source = transformers.AutoModel.from_pretrained(str(minilm_dir), local_files_only=True).state_dict()
    ckpt = spec.read_checkpoint(str(auto_gptq))
    written = proxy_losses(ckpt, source, hessians)
    assert set(written) == set(report["tensors"]) and len({r["choice"] for r in report["tensors"].values()}) > 1
    ratios = []
    for name, r in report["tensors"].items():
        q = ckpt.quantized[name]
        w = source[name].numpy()
        diag = np.diagonal(hessians[name])
        fmt = get_format(q.format)
        codes, scales = quantize_rows(w, fmt, q.group_size, q.scale_dtype, importance=diag)
        near = dequantize_codes(codes, scales, fmt, q.group_size) - w
        channel = float(np.square(near.astype(np.float64)).sum(0) @ diag) / float(np.square(w.astype(np.float64)).sum(0) @ diag)
        recorded = next(o["rel_mse"] for o in r["options"] if o["candidate"] == r["choice"])
        assert recorded == pytest.approx(channel, rel=1e-5), name
        h = hessians[name].astype(np.float64)
        d = near.astype(np.float64)
        ratios.append(written[name] / (np.einsum("ij,jk,ik->", d, h, d) / np.einsum("ij,jk,ik->", w, h, w)))
    assert max(ratios) < 1 and np.median(ratios) < 0.9, ratios


def test_measure_with_a_factor_gives_gptq_proxy_losses(rng):
    """search.measure with an inverse-Hessian factor (for scripts; the CLI's search measures nearest
    rounding): each candidate's error is tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of gptq_rows' output, computed here."""
    from exmyconv.convert import search

    rows, k = 150, 400
    w = (rng.standard_normal((rows, k)) * rng.uniform(0.01, 0.05, (rows, 1))).astype(np.float32)
    h = correlated_hessian(rng, k)
    factor = inverse_factor(h)
    cands = search.parse_candidates("e2m1,e2m1-g32,e2m2s4,e2m3s3-g100,e2m2-g64+clip")

    def chunks():
        yield from (w[:64], w[64:])  # row chunks, as the pipeline reads a tensor

    got = search.measure(chunks, cands, h, factor)
    for c, err in zip(cands, got):
        g, n = groups_of(k, c.group_size)
        sd = choose_scale_dtype(group_amax(w, g, n), c.fmt)
        codes, scales = gptq_rows(w, c.fmt, g, sd, factor, c.clip, np.diagonal(h))
        want = proxy_loss(w, codes, scales, c.fmt, g, h) / float(np.einsum("ij,jk,ik->", w.astype(np.float64), h, w))
        assert np.isfinite(err) and err == pytest.approx(want, rel=1e-6), c.name
    assert (got < search.measure(chunks, cands, h)).all()  # below nearest rounding's output errors
