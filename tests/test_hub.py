"""Hub push and Hub sources, with the real huggingface_hub client against a local fake Hub (tests/hubserver.py).

Everything that talks HTTP runs `python -m exmyconv` in a subprocess with HF_ENDPOINT pointing at the
fake server, its own HF_HOME / HF_HUB_CACHE under tmp_path and a fake HF_TOKEN: huggingface_hub reads
those when it is imported, and this process may already have imported it (with HF_HUB_OFFLINE=1, which
other test modules set).
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import exmyconv
from conftest import make_checkpoint, tree_snapshot, write_safetensors
from exmyconv import __version__
from exmyconv.integrations import hub
from exmyconv.errors import ExmyError
from hubserver import FakeHub

TOKEN = "hf_exmyconvTest" + secrets.token_hex(12)
SOURCE_CARD = ("---\nlicense: mit\nlicense_link: LICENSE\nlanguage:\n- en\ntags:\n- text-generation\n- llama\npipeline_tag: text-generation\n"
               "model-index:\n- name: src\n  results: []\n---\n# The source model\n\nLoad it with transformers.\n")
# (distinct contents: huggingface_hub fetches identical files only once)
TOKENIZER = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"model_max_length": 64}',
             "special_tokens_map.json": '{"eos_token": "</s>"}', "vocab.txt": "a\nb\n", "merges.txt": "#version: 0.2\n",
             "tokenizer.model": b"\x00spm", "added_tokens.json": '{"<x>": 5}',
             "generation_config.json": '{"do_sample": false}'}
# Files a repo also has and a conversion must not download.
JUNK = {"pytorch_model.bin": b"PK\x03\x04 pickle", "model.onnx": b"onnx", "onnx/model.safetensors": b"nested",
        "flax_model.msgpack": b"flax", "tf_model.h5": b"h5", "1_Pooling/config.json": "{}",
        "original/consolidated.00.pth": b"pth", ".gitattributes": "*.bin filter=lfs\n"}


def tensors_for(rng, rows=32):
    return {"model.layers.0.mlp.up_proj.weight": (rng.standard_normal((rows, 160)) * 0.05).astype(np.float32),
            "model.layers.0.self_attn.q_proj.weight": (rng.standard_normal((16, 160)) * 0.1).astype(np.float16),
            "model.embed_tokens.weight": rng.standard_normal((40, 160)).astype(np.float32),
            "model.norm.weight": np.ones(160, np.float32)}


CONFIG = {"model_type": "llama", "hidden_size": 160, "architectures": ["LlamaForCausalLM"]}


def folder_files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def fake_hub():
    with FakeHub(TOKEN, lifetime=120) as server:
        yield server


@pytest.fixture
def env(tmp_path, fake_hub):
    """A clean environment for the CLI: no inherited HF_*/proxy settings, everything in tmp_path."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_")) and "proxy" not in k.lower()}
    e.update(HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(tmp_path / "hf_cache"),
             HF_TOKEN=TOKEN, NO_PROXY="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1",
             PYTHONWARNINGS="ignore", EXMYCONV_DEBUG="")
    return e


def exmyconv_cli(env, *args, timeout=60):
    res = subprocess.run([sys.executable, "-m", "exmyconv", *map(str, args)], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert TOKEN not in res.stdout and TOKEN not in res.stderr, "the token was printed"
    assert "Traceback" not in res.stderr, res.stderr
    return res


def assert_token_never_written(*roots):
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"


def one_line_error(res, *needles):
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.fixture
def converted(tmp_path, rng):
    """A converted folder whose source had a README.md card (copied into OUT_DIR by quantize)."""
    src = make_checkpoint(tmp_path / "src", tensors_for(rng), config=CONFIG,
                          extra_files={"README.md": SOURCE_CARD, **TOKENIZER})
    out = tmp_path / "out"
    exmyconv.quantize(str(src), str(out), format="e2m2", progress=False)
    assert (out / "README.md").read_text() == SOURCE_CARD
    return out


def add_source_repo(fake_hub, repo_id, root: Path, junk=True, **kw) -> str:
    files = folder_files(root)
    if junk:
        files.update(JUNK)
    return fake_hub.add_repo(repo_id, files, **kw)


# --------------------------------------------------------------------------- no network

def test_is_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llama").mkdir(parents=True)
    assert hub.is_repo_id("owner/name") and hub.is_repo_id("Org-1/model.v2_x")
    assert not hub.is_repo_id("models/llama")  # an existing local folder wins
    for text in ("name", "a/b/c", "./a/b", "/abs/path", "@minilm", "a/b.", "-a/b", "a--b/c", "a/..b", ""):
        assert not hub.is_repo_id(text), text


def test_model_card(converted):
    cmd = f"exmyconv quantize --push-to-hub me/q owner/src {converted}"
    card = hub.model_card(converted, cmd, "owner/src", repo_id="me/q")
    meta, body = front_matter(card)
    assert meta["base_model"] == "owner/src" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "exmyconv"
    assert meta["license"] == "mit" and meta["language"] == ["en"] and meta["pipeline_tag"] == "text-generation"
    # OUT_DIR has no LICENSE file (the local source had none): the link points to the source repo's
    assert meta["license_link"] == "https://huggingface.co/owner/src/blob/main/LICENSE"
    assert meta["tags"][:4] == ["exmy", "exmyconv", "quantized", "e2m2"]
    assert {"text-generation", "llama"} <= set(meta["tags"]) and len(meta["tags"]) == len(set(meta["tags"]))
    assert "model-index" not in meta  # the source's evaluation results are not this model's
    report = exmyconv.inspect(str(converted))
    assert f"**{report['bits_per_weight_quantized']:.3f}**" in body
    worst = report["worst_rel_error"]
    assert f"mean {report['mean_rel_error']:.4f}, worst {worst['rel_error']:.4f} (`{worst['name']}`)" in body
    quantized = [r for r in report["tensor_table"] if r["rel_error"] is not None]
    assert f"| e2m2 (per channel) | {len(quantized)} |" in body
    assert "| F32 (unquantized) |" in body
    assert f"```bash\n{cmd}\n```" in body and f"exmyconv {__version__}" in body
    assert "format e2m2, one scale per output channel" in body
    assert 'snapshot_download("me/q")' in body
    assert "`import exmyconv` first" in body and 'from_pretrained("me/q")' in body
    assert "Load it with transformers" not in body  # the source card's text is not carried


def test_model_card_local_source(tmp_path, rng):
    """No Hub source: no base_model; the license may come from config.json; group size shown."""
    src = make_checkpoint(tmp_path / "src", tensors_for(rng), config={**CONFIG, "license": "apache-2.0"})
    out = tmp_path / "out"
    exmyconv.quantize(str(src), str(out), format="e3m2", group_size=32, progress=False)
    meta, body = front_matter(hub.model_card(out, None, str(src)))
    assert "base_model" not in meta and meta["license"] == "apache-2.0" and "e3m2" in meta["tags"]
    assert "| e3m2 (groups of 32) |" in body and "one scale per 32 weights" in body and "```bash" not in body


def test_push_refuses_what_is_not_a_good_exmy_folder(tmp_path, rng):
    plain = make_checkpoint(tmp_path / "plain", tensors_for(rng), config=CONFIG)
    with pytest.raises(ExmyError, match="not an exmy checkpoint"):
        hub.push(plain, "me/q", dry_run=True)
    with pytest.raises(ExmyError, match="no such directory"):
        hub.push(tmp_path / "missing", "me/q", dry_run=True)
    with pytest.raises(ExmyError, match="not a Hub repo id"):
        hub.push(plain, "me/q/extra", dry_run=True)


# --------------------------------------------------------------------------- push

def test_push_private(fake_hub, env, converted, tmp_path):
    before = tree_snapshot(converted)
    res = exmyconv_cli(env, "push", converted, "me/q", "--private", "--base-model", "owner/src")
    assert res.returncode == 0, res.stderr
    assert f"{fake_hub.url}/me/q" in res.stdout

    creates = [r for r in fake_hub.requests if r.path == "/api/repos/create"]
    assert len(creates) == 1 and creates[0].json["visibility"] == "private"
    assert creates[0].json["organization"] == "me" and creates[0].json["name"] == "q"
    assert fake_hub.repos["me/q"].private
    # every request carried the token; it was never printed (exmyconv_cli) nor written anywhere
    assert fake_hub.requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in fake_hub.requests)
    assert_token_never_written(tmp_path)

    uploaded = fake_hub.files("me/q")
    local = folder_files(converted)
    assert set(uploaded) - {".gitattributes"} == set(local)  # README.md: replaced by the card
    for path, data in local.items():
        if path != "README.md":
            assert uploaded[path] == data, path
    card = uploaded["README.md"].decode()
    assert card == hub.model_card(converted, f"exmyconv push --private --base-model owner/src {converted} me/q",
                                  "owner/src", repo_id="me/q")
    meta, _ = front_matter(card)
    assert meta["base_model"] == "owner/src" and meta["license"] == "mit"
    assert tree_snapshot(converted) == before  # OUT_DIR itself is not touched
    commits = [r for r in fake_hub.requests if "/commit/" in r.path]
    assert len(commits) == 1 and commits[0].path == "/api/models/me/q/commit/main"


def test_push_dry_run_sends_nothing(fake_hub, env, converted):
    env.pop("HF_TOKEN")  # no login needed either
    res = exmyconv_cli(env, "push", converted, "me/q", "--dry-run", "--private")
    assert res.returncode == 0, res.stderr
    assert fake_hub.requests == []
    lines = res.stdout.splitlines()
    assert lines[0].startswith("dry run: would upload ") and "me/q" in lines[0]
    for path, data in folder_files(converted).items():
        if path != "README.md":
            size = f"{len(data)} B" if len(data) < 1000 else "kB"
            assert any(line.split()[:1] == [path] and size in line for line in lines), path
    assert any(line.split()[:1] == ["README.md"] and "generated model card" in line for line in lines)
    assert "--- README.md ---" in res.stdout and "library_name: exmyconv" in res.stdout
    assert "uploaded" not in res.stdout


def test_push_not_logged_in(fake_hub, env, converted):
    env.pop("HF_TOKEN")
    res = exmyconv_cli(env, "push", converted, "me/q")
    one_line_error(res, "not logged in", "HF_TOKEN")
    assert fake_hub.requests == []


def test_push_wrong_token(fake_hub, env, converted):
    env["HF_TOKEN"] = "hf_wrong"
    res = exmyconv_cli(env, "push", converted, "me/q")
    one_line_error(res, "me/q", "not authorized")
    assert "me/q" not in fake_hub.repos


def test_push_private_refuses_an_existing_public_repo(fake_hub, env, converted):
    fake_hub.add_repo("me/public", {"README.md": "hello"})
    res = exmyconv_cli(env, "push", converted, "me/public", "--private")
    one_line_error(res, "me/public", "public")
    assert not [r for r in fake_hub.writes() if r.path != "/api/repos/create"]
    assert fake_hub.files("me/public") == {"README.md": b"hello"}


def test_push_to_a_branch_and_again(fake_hub, env, converted):
    res = exmyconv_cli(env, "push", converted, "me/q", "--revision", "dev")
    assert res.returncode == 0, res.stderr
    assert f"{fake_hub.url}/me/q/tree/dev" in res.stdout
    assert any(r.path == "/api/models/me/q/branch/dev" for r in fake_hub.requests)
    assert "README.md" in fake_hub.files("me/q", "dev") and "README.md" not in fake_hub.files("me/q", "main")
    # a second push to an existing repo: no error (exist_ok), unchanged files are not sent again
    fake_hub.requests.clear()
    res = exmyconv_cli(env, "push", converted, "me/q", "--revision", "dev")
    assert res.returncode == 0, res.stderr
    assert not [r for r in fake_hub.requests if "/commit/" in r.path]


def test_push_keep_readme(fake_hub, env, converted):
    res = exmyconv_cli(env, "push", converted, "me/q", "--keep-readme")
    assert res.returncode == 0, res.stderr
    assert fake_hub.files("me/q")["README.md"] == SOURCE_CARD.encode()


# --------------------------------------------------------------------------- Hub as a source

EXPECTED = {"model.safetensors", "config.json", "README.md", *TOKENIZER}


def test_quantize_from_hub_and_push(fake_hub, env, tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", tensors_for(rng), config=CONFIG,
                          extra_files={"README.md": SOURCE_CARD, "LICENSE": "MIT License\n", **TOKENIZER})
    add_source_repo(fake_hub, "owner/src", src)
    out = tmp_path / "out"
    expected = EXPECTED | {"LICENSE"}
    res = exmyconv_cli(env, "quantize", "owner/src", out, "--push-to-hub", "me/q", "--private")
    assert res.returncode == 0, res.stderr
    assert f"uploaded {len(expected)} files to {fake_hub.url}/me/q" in res.stdout

    downloaded = fake_hub.downloaded()
    assert sorted(downloaded) == sorted(expected)  # each once, nothing else (no .bin, .onnx, subfolders)
    # the same conversion as from the local folder
    ref = tmp_path / "ref"
    exmyconv.quantize(str(src), str(ref), progress=False)
    assert folder_files(out) == folder_files(ref)

    card = fake_hub.files("me/q")["README.md"].decode()
    meta, body = front_matter(card)
    assert meta["base_model"] == "owner/src" and meta["license"] == "mit" and "llama" in meta["tags"]
    assert meta["license_link"] == "LICENSE" and fake_hub.files("me/q")["LICENSE"] == b"MIT License\n"
    assert f"```bash\nexmyconv quantize --push-to-hub me/q --private owner/src {out}\n```" in body
    assert fake_hub.repos["me/q"].private
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in fake_hub.requests)
    assert_token_never_written(tmp_path)


def test_sharded_source_downloads_only_the_indexed_shards(fake_hub, env, tmp_path, rng):
    t = tensors_for(rng)
    names = list(t)
    src = make_checkpoint(tmp_path / "src", t, config=CONFIG, shards=[names[:2], names[2:]])
    write_safetensors(src / "consolidated.safetensors", t, {"format": "pt"})  # a duplicate the index does not name
    add_source_repo(fake_hub, "owner/sharded", src)
    res = exmyconv_cli(env, "quantize", "owner/sharded", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert sorted(fake_hub.downloaded()) == sorted(["model.safetensors.index.json", "config.json",
                                                    "model-00001-of-00002.safetensors",
                                                    "model-00002-of-00002.safetensors"])


def test_revision(fake_hub, env, tmp_path, rng):
    v1 = make_checkpoint(tmp_path / "v1", tensors_for(rng, rows=32), config=CONFIG)
    v2 = make_checkpoint(tmp_path / "v2", tensors_for(rng, rows=48), config=CONFIG)
    add_source_repo(fake_hub, "owner/src", v1, junk=False)
    v2_oid = add_source_repo(fake_hub, "owner/src", v2, junk=False, branch="v2")
    res = exmyconv_cli(env, "quantize", "owner/src", tmp_path / "out", "--revision", "v2")
    assert res.returncode == 0, res.stderr
    assert {r.path for r in fake_hub.requests if r.method == "GET" and "/resolve/" in r.path} == \
        {f"/owner/src/resolve/{v2_oid}/{name}" for name in ("model.safetensors", "config.json")}
    shapes = {r["name"]: r["shape"] for r in exmyconv.inspect(str(tmp_path / "out"))["tensor_table"]}
    assert shapes["model.layers.0.mlp.up_proj.weight"] == [48, 160]

    res = exmyconv_cli(env, "quantize", "owner/src", tmp_path / "out2", "--revision", "nope")
    one_line_error(res, "owner/src", "revision 'nope' not found")
    assert not (tmp_path / "out2").exists()
    res = exmyconv_cli(env, "quantize", tmp_path / "v1", tmp_path / "out3", "--revision", "v2")
    one_line_error(res, "--revision needs a Hub repo id")


@pytest.mark.parametrize("case", ["missing", "private", "gated", "pickles only"])
def test_source_errors(fake_hub, env, tmp_path, rng, case):
    src = make_checkpoint(tmp_path / "src", tensors_for(rng), config=CONFIG)
    if case == "private":
        add_source_repo(fake_hub, "owner/src", src, private=True)
        env.pop("HF_TOKEN")
    elif case == "gated":
        add_source_repo(fake_hub, "owner/src", src, gated=True)
    elif case == "pickles only":
        fake_hub.add_repo("owner/src", {"pytorch_model.bin": b"pickle", "config.json": "{}"})
    res = exmyconv_cli(env, "quantize", "owner/src", tmp_path / "out")
    expected = {"missing": "not a local folder, and no such model repository",
                "private": "no such model repository",
                "gated": "gated repository", "pickles only": "no .safetensors weights"}[case]
    one_line_error(res, "owner/src", expected)
    assert not (tmp_path / "out").exists()
    assert fake_hub.downloaded() == []


def test_offline(fake_hub, env, tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", tensors_for(rng), config=CONFIG, extra_files=TOKENIZER)
    add_source_repo(fake_hub, "owner/src", src)
    assert exmyconv_cli(env, "quantize", "owner/src", tmp_path / "online").returncode == 0
    fake_hub.requests.clear()

    offline = dict(env, HF_HUB_OFFLINE="1")
    res = exmyconv_cli(offline, "quantize", "owner/src", tmp_path / "warm")
    assert res.returncode == 0, res.stderr
    assert fake_hub.requests == []
    assert folder_files(tmp_path / "warm") == folder_files(tmp_path / "online")

    cold = dict(offline, HF_HUB_CACHE=str(tmp_path / "empty_cache"))
    res = exmyconv_cli(cold, "quantize", "owner/src", tmp_path / "cold")
    one_line_error(res, "owner/src", "not in the Hub cache", "HF_HUB_OFFLINE")
    assert fake_hub.requests == [] and not (tmp_path / "cold").exists()


def test_unreachable_hub_falls_back_to_the_cache(fake_hub, env, tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", tensors_for(rng), config=CONFIG)
    add_source_repo(fake_hub, "owner/src", src)
    assert exmyconv_cli(env, "quantize", "owner/src", tmp_path / "online").returncode == 0
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    res = exmyconv_cli(dict(env, HF_ENDPOINT=dead), "quantize", "owner/src", tmp_path / "again")
    assert res.returncode == 0, res.stderr
    res = exmyconv_cli(dict(env, HF_ENDPOINT=dead, HF_HUB_CACHE=str(tmp_path / "empty")), "quantize", "owner/src",
                       tmp_path / "cold")
    one_line_error(res, "owner/src", "cannot reach", "not in the Hub cache")


def test_push_to_hub_checks_login_before_converting(fake_hub, env, converted, tmp_path):
    env.pop("HF_TOKEN")
    res = exmyconv_cli(env, "quantize", tmp_path / "src", tmp_path / "out2", "--push-to-hub", "me/q")
    one_line_error(res, "not logged in")
    assert not (tmp_path / "out2").exists() and fake_hub.requests == []
    res = exmyconv_cli(env, "quantize", tmp_path / "src", tmp_path / "out2", "--private")
    one_line_error(res, "--private needs --push-to-hub")


def test_python_api_accepts_a_repo_id(fake_hub, env, tmp_path, rng):
    src = make_checkpoint(tmp_path / "src", tensors_for(rng), config=CONFIG)
    add_source_repo(fake_hub, "owner/src", src)
    code = ("import sys, exmyconv; s = exmyconv.quantize('owner/src', sys.argv[1]); "
            "print(s.quantized, exmyconv.inspect(sys.argv[1])['intact'])")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.split() == ["2", "True"], res.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"
