"""`quantize --dry-run`: the plan of the run — the same formats, groups, bytes and shards, for auto the same
search — with nothing written; and `quantize --json`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import exmyconv
from conftest import make_checkpoint, tree_snapshot
from exmyconv.convert import pipeline


def rows_of(out) -> dict:
    return {r["name"]: r for r in exmyconv.inspect(str(out))["tensor_table"]}


@pytest.fixture
def workdir(tmp_path, small_source):
    """The source, and a parent for OUT_DIR holding a stale temporary folder of a dead run (which a real
    run would remove: a dry run must not)."""
    src = small_source[0]
    parent = tmp_path / "outs"
    stale = parent / f".x.exmyconv-tmp-{2**22 + 12345}"
    stale.mkdir(parents=True)
    (stale / ".exmyconv-owner").write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 12345}))
    return src, parent


@pytest.mark.parametrize("args", [[], ["--format", "e2m2s4", "--group-size", "64", "--max-shard-size", "4kB"],
                                  ["--format", "e3m2", "--quantize-embeddings", "--skip", "q_proj"]])
def test_dry_run_writes_nothing_and_plans_what_the_run_writes(workdir, tmp_path, run_cli, args):
    src, parent = workdir
    out = parent / "deeper" / "out"
    before = tree_snapshot(tmp_path)
    code, text, err = run_cli("quantize", src, out, "--dry-run", *args)
    assert code == 0, err
    code, js, err = run_cli("quantize", src, out, "--dry-run", "--json", *args)
    assert code == 0, err
    assert tree_snapshot(tmp_path) == before  # no OUT_DIR, no parent, no temporary folder, stale one kept
    plan = json.loads(js)
    assert plan["dry_run"] is True and plan["errors"] == {} and text.startswith("dry run: ")

    code, real_js, err = run_cli("quantize", src, out, "--no-verify", "--json", *args)
    assert code == 0, err
    real = json.loads(real_js)
    for key in ("format", "tensors", "quantized", "quantized_weights", "bits_per_weight", "bits_per_weight_nominal",
                "source_bytes", "output_bytes", "shards", "formats", "kept", "tied"):
        assert plan[key] == real[key], key
    stored = rows_of(out)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted({r["shard"] for r in plan["plan"] if r["action"] != "tied"}) == files
    for row in plan["plan"]:
        if row["action"] == "tied":
            assert row["name"] not in stored
            continue
        got = stored[row["name"]]
        assert row["bytes"] == got["bytes"] and row["shard"] == got["file"], row
        if row["action"] == "quantize":
            assert (row["format"], row["group"]) == (got["format"], got["group"])
            assert row["bits"] == pytest.approx(got["bits"]) and row["bits_nominal"] == pytest.approx(got["bits_nominal"])
            assert f"{row['name']}" in text and f"{row['bytes']:,}" in text
        else:
            assert row["reason"] == real["kept"].get(row["name"], row["reason"])
    assert f"{plan['bits_per_weight']:.3f} effective" in text


def test_dry_run_auto_shows_the_search_the_run_makes(workdir, run_cli):
    src, parent = workdir
    out = parent / "auto"
    args = ["--format", "auto", "--bits", "8", "--candidates", "e2m1-g32,e2m2,e2m3-g64,e4m3"]
    code, js, err = run_cli("quantize", src, out, "--dry-run", "--json", *args)
    assert code == 0, err
    plan = json.loads(js)
    code, text, err = run_cli("quantize", src, out, "--dry-run", *args)
    assert code == 0 and not out.exists()
    assert "error vs bits, whole model" in text and "pred. error" in text
    code, _, err = run_cli("quantize", src, out, "--no-verify", *args)
    assert code == 0, err
    sidecar = json.loads((out / "exmy_search.json").read_text())
    for key in ("candidates", "achieved_bits", "mean_rel_mse", "tradeoff", "tensors"):
        assert plan["search"][key] == sidecar[key], key
    stored = rows_of(out)
    for name, entry in plan["search"]["tensors"].items():
        chosen = next(o for o in entry["options"] if o["candidate"] == entry["choice"])
        assert np.sqrt(chosen["rel_mse"]) == pytest.approx(stored[name]["rel_error"], rel=1e-3, abs=1e-6)
        assert f"{np.sqrt(chosen['rel_mse']):.4f}" in text


def test_dry_run_refuses_what_the_run_refuses(workdir, run_cli, tmp_path):
    src, parent = workdir
    full = parent / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    for args in ([full], [src / "inside"]):
        code, out, err = run_cli("quantize", src, *args)
        code_dry, out_dry, err_dry = run_cli("quantize", src, *args, "--dry-run")
        assert code == code_dry == 1 and err == err_dry and out_dry == "", (err, err_dry)
    code, out, err = run_cli("quantize", src, full, "--dry-run", "--overwrite")
    assert code == 0 and (full / "keep.txt").read_text() == "mine" and len(list(full.iterdir())) == 1
    code, _, err = run_cli("quantize", src, parent / "o", "--dry-run", "--push-to-hub", "me/q")
    assert code == 1 and "--push-to-hub" in err and not (parent / "o").exists()


def test_dry_run_reads_headers_only_for_a_fixed_format(tmp_path, rng, monkeypatch):
    """A fixed-format plan needs the headers alone: no tensor data is read (the search of auto reads it)."""
    src = make_checkpoint(tmp_path / "src", {"a.weight": rng.standard_normal((8, 256)).astype(np.float32)})

    def no_quantizing(*args, **kwargs):
        raise AssertionError("a dry run quantized a tensor")

    monkeypatch.setattr(pipeline, "quantize_item", no_quantizing)
    monkeypatch.setattr(pipeline, "write_shard", no_quantizing)
    s = pipeline.dry_run(str(src), str(tmp_path / "out"), pipeline.Options(format="e2m1", group_size=32))
    assert s.plan[0]["bytes"] == 8 * (128 + 16) and s.output_bytes == 8 * (128 + 16)
    assert s.nominal_bits_per_weight == pytest.approx(4 + 0.5) and s.bits_per_weight == pytest.approx(4.5)
    assert not (tmp_path / "out").exists()


def test_quantize_json(small_source, tmp_path, run_cli):
    src = small_source[0]
    out = tmp_path / "out"
    code, js, err = run_cli("quantize", src, out, "--format", "e2m3", "--json", "--no-verify")
    assert code == 0, err
    result = json.loads(js)  # stdout is the object alone; notes and warnings are on stderr
    assert f"wrote {out}" in err and "left unquantized" in err
    report = exmyconv.inspect(str(out))
    assert result["dry_run"] is False and result["out_dir"] == str(out) and result["format"] == "e2m3"
    assert result["bits_per_weight"] == pytest.approx(report["bits_per_weight_quantized"])
    assert result["bits_per_weight_nominal"] == pytest.approx(report["bits_per_weight_nominal"])
    stored = {r["name"]: r["rel_error"] for r in report["tensor_table"] if r["rel_error"] is not None}
    assert result["errors"] == pytest.approx(stored, rel=1e-5)
    assert result["worst_error"]["rel_error"] == pytest.approx(max(stored.values()), rel=1e-5)
    assert set(result["kept"]) == set(json.loads((out / "config.json").read_text())["quantization_config"]["ignore"])
    assert "verify" not in result and "plan" not in result


def test_quantize_json_with_verify(small_source, tmp_path, run_cli):
    out = tmp_path / "out"
    code, js, err = run_cli("quantize", small_source[0], out, "--json", "--verify")
    assert code == 0, err
    v = json.loads(js)["verify"]
    assert v["ok"] is True and v["tensors"] == json.loads(js)["quantized"]
    assert set(v["errors_vs_source"]) == set(json.loads(js)["errors"])


def test_python_api_dry_run_plans_what_it_would_write(workdir, tmp_path):
    """exmyconv.quantize(..., dry_run=True): the CLI's plan, nothing written; the real call then writes
    exactly the planned bytes per tensor."""
    src, parent = workdir
    before = tree_snapshot(tmp_path)
    s = exmyconv.quantize(str(src), str(parent / "api"), format="e2m2s4", group_size=64, dry_run=True)
    assert tree_snapshot(tmp_path) == before and s.plan and not s.errors
    with pytest.raises(exmyconv.ExmyError, match="dry_run only plans"):
        exmyconv.quantize(str(src), str(parent / "api"), dry_run=True, resume=True)
    done = exmyconv.quantize(str(src), str(parent / "api"), format="e2m2s4", group_size=64)
    assert done.output_bytes == s.output_bytes
    written = rows_of(parent / "api")
    assert {r["name"] for r in s.plan} == set(written)
    for row in s.plan:
        got = written[row["name"]]
        assert got["bytes"] == row["bytes"], row
        assert got["format"] == (row["format"] if row["action"] == "quantize" else row["dtype"]), row
