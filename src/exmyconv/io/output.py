"""Writing a checkpoint folder safely: a temporary sibling renamed into place on success.

The temporary folder is removed on any failure, Ctrl-C, SIGTERM and SIGHUP included; a run that was
killed outright (SIGKILL, power loss) leaves it behind, and the next run into the same parent folder
removes it when it can prove that its writer is gone (its owner record names this host and a process
that no longer exists), and otherwise says that it is there.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from ..errors import ExmyError, Interrupted
from ..format.layout import CONFIG_FILE, INDEX_FILE, SEARCH_REPORT, shard_name
from .validate import PICKLE_SUFFIXES, read_json

NOT_COPIED = (CONFIG_FILE, INDEX_FILE, SEARCH_REPORT)  # top-level files each writer makes itself
TEMP_MARK = ".exmyconv-tmp-"  # a temporary folder is ".NAME.exmyconv-tmp-PID", next to OUT_DIR
OWNER_FILE = ".exmyconv-owner"  # inside it: {"host": ..., "pid": ...} of the run that writes it
NAME_KEPT = 100  # longer OUT_DIR names are shortened in the temporary name (NAME_MAX is 255 bytes)
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def copy_side_files(root: Path, dest: Path) -> None:
    """Tokenizer, generation config, ...: everything but weights, our own files and hidden files."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if rel.name in NOT_COPIED and len(rel.parts) == 1:
            continue
        if path.suffix in (".safetensors", *PICKLE_SUFFIXES):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / rel)


def write_index(folder: Path, shards: list[list[str]], total_size: int) -> None:
    """model.safetensors.index.json for more than one shard (tensor names per shard, in order)."""
    if len(shards) > 1:
        weight_map = {name: shard_name(n, len(shards)) for n, names in enumerate(shards) for name in names}
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _check_out_dir(out: Path, source_root: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExmyError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExmyError(f"{out}: not empty (use --overwrite to replace it)")
    src, dst = source_root.resolve(), out.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise ExmyError(f"{out}: must not be the source directory or inside/around it")


# --------------------------------------------------------------------------- temporary folders


def temp_dir(out: Path, pid: int | None = None) -> Path:
    """The temporary sibling of OUT_DIR for process ``pid``: ``.NAME.exmyconv-tmp-PID``, with a long
    NAME cut to 91 characters + ``~`` + 8 hex digits of its hash, so the name always fits NAME_MAX."""
    name = out.name
    if len(name.encode("utf-8", "surrogateescape")) > NAME_KEPT:
        digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        cut = name.encode("utf-8", "surrogateescape")[:NAME_KEPT - 9].decode("utf-8", "ignore")
        name = f"{cut}~{digest}"
    return out.parent / f".{name}{TEMP_MARK}{os.getpid() if pid is None else pid}"


def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's process), or we cannot tell: treat as running
    return True


def _owner(folder: Path) -> dict | None:
    try:
        data = read_json(folder / OWNER_FILE)
    except ExmyError:  # missing, not a regular file, not JSON: no owner we can trust
        return None
    ok = isinstance(data, dict) and isinstance(data.get("host"), str) and type(data.get("pid")) is int
    return data if ok else None


def _stderr_notice(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def clean_stale_temp_dirs(parent: Path, notice=_stderr_notice) -> list[Path]:
    """Temporary folders of exmyconv runs in ``parent`` whose writer is gone: removed when their owner
    record names this host and a process that no longer exists; otherwise (no owner record, another
    host) left alone with a notice. A folder whose process still exists is some run's work in
    progress and is not touched. Returns the removed folders."""
    removed = []
    try:
        entries = sorted(p for p in parent.iterdir() if p.name.startswith(".") and TEMP_MARK in p.name)
    except OSError:
        return removed
    for folder in entries:
        pid_text = folder.name.rsplit(TEMP_MARK, 1)[1]
        if not pid_text.isdigit() or folder.is_symlink() or not folder.is_dir():
            continue
        owner = _owner(folder)
        if owner is not None and owner["host"] == _host() and owner["pid"] == int(pid_text):
            if not _alive(owner["pid"]):
                shutil.rmtree(folder, ignore_errors=True)
                if not folder.exists():
                    removed.append(folder)
                    notice(f"removed {folder}: the temporary folder of an exmyconv run (process {pid_text}) "
                           "that ended without cleaning up")
        elif owner is not None and owner["host"] != _host():
            notice(f"{folder} is the temporary folder of an exmyconv run on {owner['host']} (process "
                   f"{pid_text}); remove it if that run has ended")
        elif not _alive(int(pid_text)):
            notice(f"{folder} looks like the temporary folder of an exmyconv run that ended without "
                   "cleaning up (no owner record); remove it if no exmyconv run is writing it")
    return removed


@contextmanager
def _signals_interrupt():
    """In the main thread, SIGTERM and SIGHUP (where their handler is the default, i.e. fatal) raise
    :class:`~exmyconv.errors.Interrupted`, like Ctrl-C, so that the cleanup below runs; repeated
    signals during that cleanup are ignored. The previous handlers are put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state = {"raised": False}

    def handler(signum, frame):
        if not state["raised"]:
            state["raised"] = True
            raise Interrupted(signum)

    previous = {}
    for sig in SIGNALS:
        if signal.getsignal(sig) == signal.SIG_DFL:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def atomic_dir(out_dir: str, source_root: Path, overwrite: bool, notice=_stderr_notice):
    """Yield a temporary sibling of OUT_DIR; on success it replaces OUT_DIR, on any failure
    (Ctrl-C, SIGTERM and SIGHUP included) it and the parent folders created for it are removed.
    Stale temporary folders of earlier runs in the same parent are cleaned up first (``notice``
    says what was done)."""
    out = Path(out_dir)
    _check_out_dir(out, source_root, overwrite)
    created = []  # ancestors that do not exist yet, deepest first
    for parent in out.absolute().parents:
        if parent.exists():
            break
        created.append(parent)
    with _signals_interrupt():
        tmp = temp_dir(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temp_dirs(out.parent, notice)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            (tmp / OWNER_FILE).write_text(json.dumps({"host": _host(), "pid": os.getpid()}) + "\n")
            yield tmp
            (tmp / OWNER_FILE).unlink()
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for parent in created:
                try:
                    parent.rmdir()
                except OSError:
                    break
            raise
