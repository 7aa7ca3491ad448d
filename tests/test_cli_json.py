"""--json on every command that prints a result: stdout is one JSON object that agrees with the text
report and the files, anything else goes to stderr, and exit statuses are those of the text mode."""
from __future__ import annotations

import json

import numpy as np
import pytest

import exmyconv
from conftest import Raw, make_checkpoint, read_safetensors, tree_snapshot, write_safetensors
from exmyconv.cli.output import plain, plural, to_json


def tensors_for(rng):
    return {"model.layers.0.mlp.up_proj.weight": (rng.standard_normal((24, 200)) * 0.05).astype(np.float32),
            "model.layers.0.self_attn.q_proj.weight": (rng.standard_normal((16, 96)) * 0.1).astype(np.float16),
            "model.embed_tokens.weight": rng.standard_normal((40, 96)).astype(np.float32),
            "model.norm.weight": np.ones(96, np.float32)}


@pytest.fixture
def source(tmp_path, rng):
    return make_checkpoint(tmp_path / "src", tensors_for(rng), config={"model_type": "llama"})


@pytest.fixture
def converted(source, tmp_path):
    out = tmp_path / "out"
    exmyconv.quantize(str(source), str(out), format="e2m2", progress=False)
    return out


def one_object(out: str) -> dict:
    obj = json.loads(out)  # the whole of stdout: nothing printed around the object
    assert isinstance(obj, dict)
    return obj


def test_plain_and_plural():
    data = {"a": np.float32(0.5), "b": np.arange(3), "c": (1, float("nan")), 2: float("inf")}
    assert plain(data) == {"a": 0.5, "b": [0, 1, 2], "c": [1, None], "2": None}
    assert json.loads(to_json(data))["c"] == [1, None]
    assert [plural(n, "weight") for n in (0, 1, 2)] == ["0 weights", "1 weight", "2 weights"]


def test_verify_json(converted, source, run_cli):
    code, out, err = run_cli("verify", converted, "--source", source, "--no-gpu", "--json")
    assert code == 0, err
    result = one_object(out)
    assert result["ok"] is True and result["problems"] == [] and result["tensors"] == 2
    assert result["gpu"].startswith("skipped")
    stored = {r["name"]: r["rel_error"] for r in exmyconv.inspect(str(converted))["tensor_table"]
              if r["rel_error"] is not None}
    assert set(result["errors_vs_source"]) == set(stored)
    for name, err_ in result["errors_vs_source"].items():
        assert err_ == pytest.approx(stored[name], rel=1e-3)


def test_verify_json_keeps_exit_status_2(converted, run_cli):
    path = converted / "model.safetensors"
    meta, tensors, _ = read_safetensors(path)
    write_safetensors(path, {k: Raw(v[0], v[1], bytes(len(v[2])) if k.endswith("_scale") else v[2])
                             for k, v in tensors.items()}, meta)
    code, text, _ = run_cli("verify", converted, "--no-gpu")
    code_json, out, _ = run_cli("verify", converted, "--no-gpu", "--json")
    assert code == code_json == 2
    result = one_object(out)
    assert result["ok"] is False and result["problems"]
    assert all(p in text for p in result["problems"])


def test_dequantize_json(converted, tmp_path, run_cli):
    code, out, err = run_cli("dequantize", converted, tmp_path / "fp", "--json")
    assert code == 0, err
    result = one_object(out)
    assert result == {"out_dir": str(tmp_path / "fp"), "dtype": "float16", "tensors": 4, "dequantized": 2,
                      "shards": 1, "bytes": (tmp_path / "fp" / "model.safetensors").stat().st_size
                      - 8 - int.from_bytes((tmp_path / "fp" / "model.safetensors").read_bytes()[:8], "little")}
    # an error stays one line on stderr, exit 1, with or without --json
    code, out, err = run_cli("dequantize", converted, tmp_path / "fp", "--json")
    assert code == 1 and out == "" and err.startswith("error: ") and "--overwrite" in err


def test_push_dry_run_json(converted, run_cli):
    before = tree_snapshot(converted)
    code, text, err = run_cli("push", converted, "me/q", "--dry-run")
    assert code == 0, err
    code, out, err = run_cli("push", converted, "me/q", "--dry-run", "--json", "--revision", "dev")
    assert code == 0, err
    plan = one_object(out)
    assert plan["dry_run"] is True and plan["repo_id"] == "me/q" and plan["revision"] == "dev"
    files = {f["path"]: f for f in plan["files"]}
    assert files["README.md"]["generated"] and files["README.md"]["bytes"] == len(plan["card"].encode())
    for path in ("model.safetensors", "config.json"):
        assert files[path]["bytes"] == (converted / path).stat().st_size and not files[path]["generated"]
        assert path in text
    assert plan["bytes"] == sum(f["bytes"] for f in plan["files"])
    assert plan["card"].startswith("---\n") and "library_name: exmyconv" in plan["card"]
    assert tree_snapshot(converted) == before


def test_inspect_json_sends_notes_to_stderr(tmp_path, run_cli, rng):
    pytest.importorskip("matplotlib")
    src = make_checkpoint(tmp_path / "src", {f"l{i}.weight": rng.standard_normal((8, 128)).astype(np.float32)
                                             for i in range(3)})
    out = tmp_path / "out"
    exmyconv.quantize(str(src), str(out), format="auto", bits=6, progress=False)
    code, stdout, err = run_cli("inspect", out, "--json", "--plot", tmp_path / "c.png")
    assert code == 0, err
    assert one_object(stdout)["quantized_tensors"] == 3 and "wrote" in err and (tmp_path / "c.png").is_file()
