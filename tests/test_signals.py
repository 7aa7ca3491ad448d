"""Signals and temporary folders (issue 17): real processes, real signals, bounded time.

``quantize`` and ``dequantize`` write into a hidden temporary sibling of OUT_DIR. SIGINT, SIGTERM and
SIGHUP must remove it and leave nothing at OUT_DIR; a run killed outright (SIGKILL) leaves it, and the
next run into the same folder removes it (its owner record proves the writer is gone) and says so.
The runs are slowed down (each packed chunk or written tensor waits a little) so that the signal
always arrives mid-run; everything else is the installed console entry point's own code.
"""
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
from conftest import make_checkpoint, signals_at_default, tree_snapshot

ROOT = Path(__file__).resolve().parents[1]
TEMP_MARK = ".exmyconv-tmp-"  # docs/usage.md: OUT_DIR is written as .NAME.exmyconv-tmp-PID first
OWNER_FILE = ".exmyconv-owner"  # in it: the writing run's host and process id
SLOW_MAIN = """
import sys, time
from exmyconv.convert import dequantize, pipeline

def slow(fn):
    def wrapped(*args, **kwargs):
        time.sleep(0.2)
        return fn(*args, **kwargs)
    return wrapped

pipeline.pack_codes = slow(pipeline.pack_codes)              # runs on the worker threads
dequantize._write_tensor = slow(dequantize._write_tensor)    # runs on the main thread
from exmyconv.cli import main
main(sys.argv[1:])
"""


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    t = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((16, 64)).astype(np.float32) for i in range(60)}
    return make_checkpoint(tmp_path / "src", t, config={"model_type": "x"})


def start(tmp_path, *args) -> subprocess.Popen:
    script = tmp_path / "slow_main.py"
    script.write_text(SLOW_MAIN)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=signals_at_default)


def wait_for_temp(parent: Path, proc: subprocess.Popen, timeout: float = 60) -> Path:
    """The run's temporary folder, once it holds a file other than the owner record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for tmp in parent.glob(f".*{TEMP_MARK}{proc.pid}"):
            if any(p.name != OWNER_FILE for p in tmp.iterdir()):
                return tmp
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the run never started writing")


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run did not end after the signal")
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("command", ["quantize", "dequantize"])
def test_signal_leaves_nothing(tmp_path, source, command, sig):
    if command == "dequantize":
        exmyconv.quantize(str(source), str(tmp_path / "q"), progress=False)
        source = tmp_path / "q"
    out = tmp_path / "new" / "out"  # its parent is created for the run, and must go too
    before = tree_snapshot(tmp_path)
    proc = start(tmp_path, command, source, out)
    tmp = wait_for_temp(out.parent, proc)
    assert tmp.parent == out.parent and tmp.is_dir()
    os.kill(proc.pid, sig)
    code, stdout, err = finish(proc)
    assert code == 128 + sig, (code, stdout, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["interrupted" + ("" if sig == signal.SIGINT else f" by {sig.name}")], err
    assert "Traceback" not in stdout + err
    after = tree_snapshot(tmp_path)
    after.pop("slow_main.py")
    assert after == before, "the temporary folder (or OUT_DIR, or its new parent) was left behind"


def test_killed_run_is_cleaned_up_by_the_next(tmp_path, source):
    out = tmp_path / "out"
    proc = start(tmp_path, "quantize", source, out)
    tmp = wait_for_temp(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert tmp.is_dir() and not out.exists()  # SIGKILL cannot be handled: the folder stays ...
    owner = json.loads((tmp / OWNER_FILE).read_text())
    assert owner == {"host": socket.gethostname(), "pid": proc.pid}
    # ... until the next run into the same folder (to another OUT_DIR, even) removes it and says so
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "exmyconv", "quantize", str(source), str(tmp_path / "other")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not tmp.exists()
    notes = [ln for ln in done.stderr.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and str(tmp) in notes[0] and "removed" in notes[0] and str(proc.pid) in notes[0]
    assert not (tmp_path / "other" / OWNER_FILE).exists()


def test_stale_folders_that_cannot_be_proven_dead_are_only_reported(run_cli, tmp_path, source):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".out.exmyconv-tmp-{dead.pid}"  # written by an older exmyconv: no owner record
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"partial")
    remote = tmp_path / f".x.exmyconv-tmp-{dead.pid}"  # another machine's run (a shared file system)
    remote.mkdir()
    (remote / OWNER_FILE).write_text(json.dumps({"host": "elsewhere.example", "pid": dead.pid}))
    running = tmp_path / f".y.exmyconv-tmp-{os.getpid()}"  # a run in progress (this process)
    running.mkdir()
    (running / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    code, _, err = run_cli("quantize", source, tmp_path / "out2")
    assert code == 0, err
    assert old.is_dir() and remote.is_dir() and running.is_dir()
    notes = [ln for ln in err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 2 and str(old) in notes[0] and "no owner record" in notes[0]
    assert str(remote) in notes[1] and "elsewhere.example" in notes[1]


def test_a_250_character_out_dir_name(run_cli, tmp_path, source):
    """NAME_MAX is 255 bytes: the temporary name (.NAME.exmyconv-tmp-PID) must shorten a long NAME."""
    out = tmp_path / ("m" * 250)
    code, _, err = run_cli("quantize", source, out)
    assert code == 0, err
    code, _, err = run_cli("dequantize", out, tmp_path / ("d" * 250))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", "m" * 250, "d" * 250])
    from exmyconv.io.output import temp_dir

    assert len(temp_dir(out).name) <= 255 and temp_dir(out).name.endswith(f"{TEMP_MARK}{os.getpid()}")
    assert temp_dir(tmp_path / "short").name == f".short{TEMP_MARK}{os.getpid()}"
