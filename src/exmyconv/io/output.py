"""Writing a checkpoint folder safely: a temporary sibling renamed into place on success.

The temporary folder is removed on any failure, Ctrl-C, SIGTERM and SIGHUP included; a run that was
killed outright (SIGKILL, power loss) leaves it behind, and the next run into the same parent folder
removes it when it can prove that its writer is gone (its owner record names this host and a process
that no longer exists), and otherwise says that it is there.

One exception, decided in one place (:func:`resumable`, used by :func:`atomic_dir` and
:func:`clean_stale_temp_dirs` alike): a temporary folder that holds a resume journal
(``RESUME_FILE``, written by convert/resume.py once a run has finished some work) is the user's
resumable work. Nothing removes it automatically; ``quantize --resume`` continues it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from ..errors import ExmyError, Interrupted
from ..format.layout import CONFIG_FILE, INDEX_FILE, RESUME_FILE, SEARCH_REPORT, shard_name
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


def check_out_dir(out: Path, source_root: Path, overwrite: bool) -> None:
    """Refuse an OUT_DIR that a run may not write (atomic_dir checks it first; `quantize --dry-run` too)."""
    if out.exists() and not out.is_dir():
        raise ExmyError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExmyError(f"{out}: not empty (use --overwrite to replace it)")
    src, dst = source_root.resolve(), out.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise ExmyError(f"{out}: must not be the source directory or inside/around it")


# --------------------------------------------------------------------------- temporary folders


def temp_dir(out: Path, pid: int | None = None, n: int = 0) -> Path:
    """The temporary sibling of OUT_DIR for process ``pid``: ``.NAME.exmyconv-tmp-PID`` (``n`` > 0:
    ``-PID.n``, when a resumable folder already has that name), with a long NAME cut to 91 characters
    + ``~`` + 8 hex digits of its hash, so the name always fits NAME_MAX."""
    name = out.name
    if len(name.encode("utf-8", "surrogateescape")) > NAME_KEPT:
        digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        cut = name.encode("utf-8", "surrogateescape")[:NAME_KEPT - 9].decode("utf-8", "ignore")
        name = f"{cut}~{digest}"
    return out.parent / f".{name}{TEMP_MARK}{os.getpid() if pid is None else pid}{f'.{n}' if n else ''}"


def _temp_pid(folder: Path) -> int | None:
    """The process id in a temporary folder's name; None if the name is not one of ours."""
    match = re.fullmatch(r"(\d+)(?:\.\d+)?", folder.name.rsplit(TEMP_MARK, 1)[1])
    return int(match[1]) if match else None


def resumable(folder: Path) -> bool:
    """The one rule for keeping a temporary folder: one that holds ``RESUME_FILE`` has an interrupted
    run's finished work (convert/resume.py), which ``quantize --resume`` continues. It is never
    removed automatically: not when its run fails or is interrupted, not as a stale folder, not by a
    new run that got the same process id."""
    return (folder / RESUME_FILE).is_file()


def _remove(folder: Path) -> bool:
    """Remove a temporary folder unless it is :func:`resumable`; True if it is gone."""
    if resumable(folder):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()


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
    progress and is not touched; a :func:`resumable` one is kept, with a notice. Returns the removed
    folders."""
    removed = []
    try:
        entries = sorted(p for p in parent.iterdir() if p.name.startswith(".") and TEMP_MARK in p.name)
    except OSError:
        return removed
    for folder in entries:
        pid = _temp_pid(folder)
        if pid is None or folder.is_symlink() or not folder.is_dir():
            continue
        owner = _owner(folder)
        if owner is not None and owner["host"] == _host() and owner["pid"] == pid:
            if _alive(pid):
                continue
            if _remove(folder):
                removed.append(folder)
                notice(f"removed {folder}: the temporary folder of an exmyconv run (process {pid}) "
                       "that ended without cleaning up")
            elif resumable(folder):
                notice(f"kept {folder}: an interrupted exmyconv run's finished work (quantize --resume "
                       "with the same arguments continues it; delete the folder to start over)")
        elif owner is not None and owner["host"] != _host():
            notice(f"{folder} is the temporary folder of an exmyconv run on {owner['host']} (process "
                   f"{pid}); remove it if that run has ended")
        elif not _alive(pid):
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


def _own_temp_name(out: Path, reuse: Path | None) -> Path:
    """This run's temporary folder name: ``temp_dir(out)``, unless a resumable folder other than
    ``reuse`` has it (a dead run's that had our pid, or this process's own earlier one): then the
    first free ``temp_dir(out, n=n)``."""
    n = 0
    while temp_dir(out, n=n) != reuse and resumable(temp_dir(out, n=n)):
        n += 1
    return temp_dir(out, n=n)


def _prepare_temp(tmp: Path, reuse: Path | None) -> None:
    """Make ``tmp`` empty, or move ``reuse`` (an interrupted run's resumable folder, locked by the
    caller) there; then the owner record is this process's."""
    if tmp != reuse:
        if tmp.exists() and not _remove(tmp):
            raise ExmyError(f"{tmp}: cannot remove this old temporary folder")
        if reuse is None:
            tmp.mkdir()
        else:
            os.rename(reuse, tmp)
    (tmp / OWNER_FILE).write_text(json.dumps({"host": _host(), "pid": os.getpid()}) + "\n")


@contextmanager
def atomic_dir(out_dir: str, source_root: Path, overwrite: bool, notice=_stderr_notice, reuse: Path | None = None):
    """Yield a temporary sibling of OUT_DIR (``reuse``: continue in an interrupted run's resumable
    folder); on success it replaces OUT_DIR, on any failure (Ctrl-C, SIGTERM and SIGHUP included) it
    and the parent folders created for it are removed, unless it is :func:`resumable` (then all stay,
    and OUT_DIR is still untouched). Stale temporary folders of earlier runs in the same parent are
    cleaned up first (``notice`` says what was done)."""
    out = Path(out_dir)
    check_out_dir(out, source_root, overwrite)
    created = []  # ancestors that do not exist yet, deepest first
    for parent in out.absolute().parents:
        if parent.exists():
            break
        created.append(parent)
    with _signals_interrupt():
        tmp = _own_temp_name(out, reuse)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _prepare_temp(tmp, reuse)
            clean_stale_temp_dirs(out.parent, notice)
            yield tmp
            if out.exists():
                shutil.rmtree(out)
            for name in (OWNER_FILE, RESUME_FILE):  # the journal goes last: until here the work is resumable
                (tmp / name).unlink(missing_ok=True)
            os.replace(tmp, out)
        except BaseException:
            if _remove(tmp):  # a resumable folder stays, and so do its parents
                for parent in created:
                    try:
                        parent.rmdir()
                    except OSError:
                        break
            raise
