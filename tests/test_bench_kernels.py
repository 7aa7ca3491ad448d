"""`exmyconv bench` reporting (host side, no GPU): table, JSON-ready rows and plot with and without peers."""
from __future__ import annotations

import pytest

from exmyconv.bench import kernels as b
from exmyconv.bench import peers


def _result(with_peers: bool) -> dict:
    gemv = []
    for fmt, bound in (("e2m2", 3.2), ("e2m2s4", 3.76)):
        for batch, ours, theirs in ((1, 50e-3, 56e-3), (16, 90e-3, 60e-3)):
            row = {"shape": "8192->28672", "k": 8192, "n": 28672, "format": fmt, "batch": batch,
                   "bits_per_weight": 16 / bound, "torch_fp16_ms": 108e-3, "exmy_ms": ours,
                   "speedup": 108e-3 / ours, "bound": bound, "pct_bound": 100 * 108e-3 / ours / bound,
                   "weight_gbps": 1.0, "kernel": "k"}
            if with_peers and fmt == "e2m2":
                row.update(humming_ms=theirs, vs_humming=theirs / ours)
            gemv.append(row)
    result = {"device": {"name": "GPU", "arch": "sm_90"}, "date": "2026-12-04", "commit": "abc", "copy": {"gbps": 4200.0},
              "dequant": [], "gemv": gemv}
    if with_peers:
        result["peers"] = [{"shape": "8192->28672", "k": 8192, "n": 28672, "peer": "humming", "format": f,
                            "batch": bt, "bits_per_weight": 4.3, "torch_fp16_ms": 108e-3, "peer_ms": ms,
                            "speedup": 108e-3 / ms} for f in ("e2m2", "int4-g128") for bt, ms in ((1, 45e-3), (16, 50e-3))]
    return result


@pytest.mark.parametrize("with_peers", [False, True])
def test_table_and_plot(with_peers, tmp_path):
    result = _result(with_peers)
    text = b.table(result)
    assert ("humming us" in text) == with_peers
    if with_peers:
        e2m2_b16 = next(line for line in text.splitlines() if line.startswith("e2m2 ") and " 16 " in line)
        assert e2m2_b16.rstrip().endswith("0.67x")  # Humming 60 us vs ours 90 us
        assert "int4-g128" in text  # a peer format we do not have gets its own lines
    assert b.plot(result, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000


def test_peer_table_covers_the_formats_both_support():
    assert set(peers.SAME_FORMAT) == {"e2m1", "e2m2", "e3m2", "e2m3"}
    assert peers.unavailable_reason() == "" or "humming" in peers.unavailable_reason()


def test_commit_names_the_tree_it_measured(tmp_path, monkeypatch):
    """The benchmark's commit: the short hash of a clean tree, marked -dirty when tracked files differ
    from it (a newer tree copied over an older checkout), EXMY_COMMIT where set, "" outside git."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git")
    monkeypatch.delenv("EXMY_COMMIT", raising=False)
    assert b.git_commit(tmp_path) == ""
    for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(name, "t")
    for cmd in (["init", "-q"], ["add", "f"], ["commit", "-q", "-m", "one"], ["tag", "v1"]):
        if cmd == ["add", "f"]:
            (tmp_path / "f").write_text("one")
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert b.git_commit(tmp_path) == head  # the hash, not the tag
    (tmp_path / "f").write_text("two")
    assert b.git_commit(tmp_path) == head + "-dirty"
    monkeypatch.setenv("EXMY_COMMIT", "given")
    assert b.git_commit(tmp_path) == "given"
