"""--resume: an interrupted conversion (SIGINT, SIGTERM, SIGKILL, an error) keeps its finished shards
and curves in its temporary folder; the same command with --resume finishes it, byte-identical to an
uninterrupted run, and refuses in one line when the source or the options changed."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import exmyconv
from conftest import (Raw, moe_checkpoint, output_snapshot, read_safetensors, signals_at_default, tree_snapshot,
                      write_safetensors)
from exmyconv.cli.main import main as cli_main
from exmyconv.convert import pipeline, resume, search
from exmyconv.errors import ExmyError
from exmyconv.format.layout import RESUME_FILE
from exmyconv.io.output import OWNER_FILE, TEMP_MARK

SRC = Path(__file__).resolve().parents[1] / "src"
ARGS = ("--group-size", "64", "--max-shard-size", "200KB")
AUTO = ("--format", "auto", "--bits", "4.5", "--candidates", "e2m1-g32,e2m2,e3m2,e2m3", "--max-shard-size", "200KB")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A sharded MoE-like checkpoint (about 20 output shards at 200 KB) and its uninterrupted outputs."""
    root = tmp_path_factory.mktemp("resume")
    src = moe_checkpoint(root / "src", np.random.default_rng(19), layers=8, hidden=256, ffn=512)
    return src, root


def quantize(*args):
    """The CLI in this process; a failure's exit status raised as SystemExit (130 for Ctrl-C)."""
    try:
        cli_main(["quantize", *map(str, args), "--no-verify"])
    except SystemExit as exc:
        if exc.code:
            raise


def reference(model, args) -> dict:
    """The uninterrupted run's output tree (cached per argument list)."""
    src, root = model
    out = root / f"ref-{len(list(root.iterdir()))}"
    REFERENCES.setdefault(args, out)
    if not REFERENCES[args].exists():
        quantize(src, REFERENCES[args], *args)
    return output_snapshot(REFERENCES[args])


REFERENCES: dict = {}


def run(src, out, *args, wait=True):
    cmd = [sys.executable, "-m", "exmyconv", "quantize", str(src), str(out), "--no-verify", *args]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=signals_at_default)


def kept_folders(out: Path) -> list[Path]:
    return [folder for folder, _ in resume.kept_folders(str(out))]


def finished_shards(out: Path) -> list[str]:
    names = []
    for folder in out.parent.iterdir():
        journal = folder / RESUME_FILE
        if journal.is_file():
            for line in journal.read_text().splitlines()[1:]:
                try:
                    names.append(json.loads(line)["shard"])
                except (ValueError, KeyError):
                    pass
    return names


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_signal_then_resume_gives_identical_output(model, tmp_path, run_cli, sig):
    src, _ = model
    args = (*ARGS, "--clip-search")  # slower: the signal comes while shards are still being written
    out = tmp_path / "out"
    proc = run(src, out, *args, wait=False)
    deadline = time.monotonic() + 120
    while not finished_shards(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), err
    if sig != signal.SIGKILL:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        how = "" if sig == signal.SIGINT else " by SIGTERM"
        assert len(lines) == 1 and lines[0].startswith(f"interrupted{how}: finished work kept in ")
        assert "--resume" in lines[0] and "Traceback" not in err, lines
    assert not out.exists()
    [folder] = kept_folders(out)
    done = finished_shards(out)
    assert 1 <= len(done) < 20
    first = folder / done[0]
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)
    code, stdout, err = run_cli("quantize", src, out, "--no-verify", *args, "--resume")
    assert code == 0, err
    assert output_snapshot(out) == reference(model, args)
    again = out / done[0]
    assert (again.stat().st_ino, again.stat().st_mtime_ns) == stamp, "a finished shard was written again"
    assert kept_folders(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def fail_after(monkeypatch, module, name, calls):
    """Make module.name raise KeyboardInterrupt on its call number ``calls`` + 1."""
    real, seen = getattr(module, name), []

    def wrapper(*args, **kwargs):
        seen.append(1)
        if len(seen) > calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def interrupted(model, out, monkeypatch, args, shards=3):
    """Run in process until shard number ``shards`` + 1 starts, then Ctrl-C; the kept folder."""
    src, _ = model
    with monkeypatch.context() as m:
        fail_after(m, pipeline, "write_shard", shards)
        with pytest.raises(SystemExit, match="130"):  # Ctrl-C with work kept
            quantize(src, out, *args)
    [folder] = kept_folders(out)
    return folder


def test_resume_refuses_changed_options_and_source(model, tmp_path, run_cli, monkeypatch):
    src, root = model
    out = tmp_path / "out"
    folder = interrupted(model, out, monkeypatch, ARGS)
    before = tree_snapshot(tmp_path)
    for args, words in [(("--group-size", "32", "--max-shard-size", "200KB"), "--group-size changed (64 -> 32)"),
                        (("--group-size", "64", "--max-shard-size", "300KB"), "--max-shard-size changed"),
                        ((*ARGS, "--format", "e3m2"), "--format changed ('e2m2' -> 'e3m2')"),
                        ((*ARGS, "--clip-search"), "--clip-search changed (False -> True)")]:
        code, stdout, err = run_cli("quantize", src, out, *args, "--resume")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 1 and len(lines) == 1 and "Traceback" not in stdout + err, err
        assert lines[0].startswith("error: cannot resume") and words in lines[0] and str(folder) in lines[0], lines
        assert tree_snapshot(tmp_path) == before, "a refused resume changes nothing"
    # a source file with other contents (same names) is refused too
    changed = tmp_path / "src"
    changed.mkdir()
    for f in src.iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    shard = sorted(changed.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header])
    meta["__metadata__"]["format"] = "pt "  # same length
    shard.write_bytes(data[:8] + json.dumps(meta).encode().ljust(header) + data[8 + header:])
    code, _, err = run_cli("quantize", changed, out, *ARGS, "--resume")
    assert code == 1 and f"source file {shard.name} changed" in err, err
    # the original command finishes it
    code, _, err = run_cli("quantize", src, out, "--no-verify", *ARGS, "--resume")
    assert code == 0, err
    assert output_snapshot(out) == reference(model, ARGS)
    assert not folder.exists()


def test_resume_rewrites_a_damaged_shard_and_survives_a_torn_journal(model, tmp_path, run_cli, monkeypatch):
    src, _ = model
    out = tmp_path / "out"
    folder = interrupted(model, out, monkeypatch, ARGS)
    done = finished_shards(out)
    assert len(done) == 3
    damaged = folder / done[1]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(data)
    with open(folder / RESUME_FILE, "ab") as f:
        f.write(b'{"shard": "model-000')  # a writer killed mid-line
    code, _, err = run_cli("quantize", src, out, "--no-verify", *ARGS, "--resume")
    assert code == 0, err
    assert output_snapshot(out) == reference(model, ARGS)


def test_auto_resumes_the_search_without_measuring_again(model, tmp_path, run_cli, monkeypatch):
    src, _ = model
    out = tmp_path / "out"
    calls, limit = [], [7]
    real = search.measure_backend

    def counting(*args):
        measure, where = real(*args)

        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) > limit[0]:
                raise KeyboardInterrupt
            return measure(*args, **kwargs)
        return wrapper, where

    with monkeypatch.context() as m:
        m.setattr(search, "measure_backend", counting)
        with pytest.raises(SystemExit, match="130"):
            quantize(src, out, *AUTO)
    [folder] = kept_folders(out)
    lines = (folder / RESUME_FILE).read_text().splitlines()
    assert len(lines) == 1 + 7 and all('"curve"' in ln for ln in lines[1:])
    calls.clear()
    limit[0] = 10**9
    with monkeypatch.context() as m:
        m.setattr(search, "measure_backend", counting)
        code, stdout, err = run_cli("quantize", src, out, "--no-verify", *AUTO, "--resume")
    assert code == 0, err
    report = json.loads((out / "exmy_search.json").read_text())
    assert len(calls) == len(report["tensors"]) - 7, "measured curves are kept"
    assert output_snapshot(out) == reference(model, AUTO)


def test_without_resume_a_kept_folder_is_left_alone(model, tmp_path, run_cli, monkeypatch):
    src, _ = model
    out = tmp_path / "out"
    folder = interrupted(model, out, monkeypatch, ARGS)
    kept = tree_snapshot(folder)
    # in this process, so the new run's temporary name (NAME-tmp-PID) is the kept folder's: it takes another
    code, _, err = run_cli("quantize", src, out, "--no-verify", *ARGS)
    assert code == 0, err
    assert output_snapshot(out) == reference(model, ARGS)
    assert tree_snapshot(folder) == kept, "a resumable folder is never deleted automatically"


def test_stale_clean_up_keeps_a_resumable_folder(model, tmp_path, run_cli, monkeypatch):
    """A dead run's temporary folder with a journal is the user's work: the next run into the same
    parent keeps it (and says so in a note) while it still removes a dead run's folder without one;
    --resume then continues it under its own name."""
    src, _ = model
    out = tmp_path / "out"
    folder = interrupted(model, out, monkeypatch, ARGS)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = json.dumps({"host": socket.gethostname(), "pid": dead.pid})
    kept = folder.rename(folder.with_name(f".out{TEMP_MARK}{dead.pid}"))  # as a SIGKILLed run leaves it
    (kept / OWNER_FILE).write_text(owner)
    stale = tmp_path / f".other{TEMP_MARK}{dead.pid}"  # the same without a journal
    stale.mkdir()
    (stale / OWNER_FILE).write_text(owner)
    (stale / "model.safetensors").write_bytes(b"partial")
    before = tree_snapshot(kept)
    code, _, err = run_cli("quantize", src, tmp_path / "third", "--no-verify", "--group-size", "64")
    assert code == 0, err
    assert not stale.exists() and tree_snapshot(kept) == before
    notes = sorted(ln for ln in err.splitlines() if ln.startswith("note:"))
    assert len(notes) == 2 and notes[0].startswith(f"note: kept {kept}: ") and "--resume" in notes[0], notes
    assert notes[1].startswith(f"note: removed {stale}: "), notes
    code, _, err = run_cli("quantize", src, out, "--no-verify", *ARGS, "--resume")
    assert code == 0 and "note:" not in err, err
    assert output_snapshot(out) == reference(model, ARGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "third"]


def test_a_failure_before_any_finished_work_leaves_nothing(model, tmp_path, monkeypatch):
    src, _ = model
    before = tree_snapshot(tmp_path)
    with monkeypatch.context() as m:
        fail_after(m, pipeline, "write_shard", 0)
        with pytest.raises(KeyboardInterrupt):
            exmyconv.quantize(str(src), str(tmp_path / "out"), group_size=64, max_shard_size=200_000)
    assert tree_snapshot(tmp_path) == before


def poison(src: Path, name: str) -> None:
    """Put a NaN into one tensor of a checkpoint folder."""
    for path in src.glob("*.safetensors"):
        meta, tensors, _ = read_safetensors(path)
        if name in tensors:
            dtype, shape, data = tensors[name]
            tensors[name] = (dtype, shape, data[:-4] + np.float32(np.nan).tobytes())
            write_safetensors(path, {k: Raw(*v) for k, v in tensors.items()}, meta)


def test_an_error_after_finished_work_keeps_it_and_says_so(tmp_path, rng, run_cli):
    src = moe_checkpoint(tmp_path / "src", rng, layers=4)
    poison(src, "model.layers.3.self_attn.v_proj.weight")
    out = tmp_path / "out"
    code, stdout, err = run_cli("quantize", src, out, "--max-shard-size", "100KB")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "'model.layers.3.self_attn.v_proj.weight' contains NaN" in lines[0], err
    assert "finished work kept in" in lines[0] and "--resume" in lines[0]
    assert not out.exists() and len(kept_folders(out)) == 1


def test_two_runs_never_continue_one_folder(model, tmp_path, monkeypatch):
    src, _ = model
    out = tmp_path / "out"
    folder = interrupted(model, out, monkeypatch, ARGS)
    source = pipeline.open_source(str(src))
    try:
        manifest = resume.manifest(source, pipeline.Options(group_size=64, max_shard_size=200_000), str(out))
    finally:
        source.close()
    with resume.Journal.resume(str(out), manifest) as first:
        assert first.folder == folder and len(first.shards) == 3
        with pytest.raises(ExmyError, match="another exmyconv process"):
            resume.Journal.resume(str(out), manifest)
