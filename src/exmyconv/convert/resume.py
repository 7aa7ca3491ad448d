"""Resuming an interrupted conversion: a journal in the temporary output folder.

Once a conversion has finished its first unit of work (an output shard, or with ``--format auto``
a tensor's measured error curve), its temporary folder (:func:`exmyconv.io.output.atomic_dir`)
holds a journal, ``RESUME_FILE``: JSON lines, the first one the *manifest* — exmyconv and layout
versions, OUT_DIR's name, the options, each source file's size and header hash, hashes of the
source's config.json and of the calibration text — and every further line one finished piece of
work: a shard (a digest of its plan, its size and sha256, its tensors' relative errors) or a curve.

A temporary folder that holds ``RESUME_FILE`` is resumable (the rule is
:func:`exmyconv.io.output.resumable`): ``atomic_dir`` keeps it when the run fails or is interrupted,
and the clean-up of stale temporary folders leaves it alone. ``quantize --resume`` finds it beside
OUT_DIR, refuses in one line when anything in the manifest changed, keeps the shards whose checksums
still match and the measured curves, and does the rest. ``atomic_dir`` removes the journal just
before the final rename, so OUT_DIR is byte-identical to an uninterrupted run's. A live run holds a
lock on its journal, so two runs never continue the same folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from .._version import __version__
from ..errors import ExmyError
from ..format.layout import CONFIG_FILE, RESUME_FILE, VERSION
from ..io.output import TEMP_MARK, resumable

SYNC_SECONDS = 1.0  # curves are fsync'ed at most this often (shards always)


def sha256_file(path: Path, limit: int | None = None) -> str:
    """sha256 of a file's bytes (its first ``limit`` bytes if given)."""
    digest = hashlib.sha256()
    left = float("inf") if limit is None else limit
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(int(min(16 << 20, left)))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    """What the journal keeps of a finished output file."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def file_matches(path: Path, record: dict) -> bool:
    """The file is still exactly what the journal recorded."""
    try:
        return path.stat().st_size == record["bytes"] and sha256_file(path) == record["sha256"]
    except OSError:
        return False


def _header_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return sha256_file(path, 8 + n)


def manifest(source, opts, out_dir: str) -> dict:
    """What must not change between an interrupted run and the run that continues it."""
    options = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "calibration"}
    options["calibration"] = sha256_file(Path(opts.calibration)) if opts.calibration else None
    config = source.root / CONFIG_FILE
    data = {"exmyconv": __version__, "layout": VERSION, "out": Path(out_dir).name, "options": options,
            "sources": {f.path.name: {"bytes": f.size, "header_sha256": _header_sha256(f.path)}
                        for f in source.files},
            "config_sha256": sha256_file(config) if config.is_file() else None}
    return json.loads(json.dumps(data))  # as it reads back from the journal


def difference(old: dict, new: dict) -> str | None:
    """The first thing that differs between two manifests, in words; None if they agree."""
    if old.get("exmyconv") != new["exmyconv"] or old.get("layout") != new["layout"]:
        return f"exmyconv {old.get('exmyconv')} (layout {old.get('layout')}) wrote it, this is " \
               f"{new['exmyconv']} (layout {new['layout']})"
    for key, value in new["options"].items():
        was = (old.get("options") or {}).get(key)
        if was != value:
            if key == "calibration":
                return "the --calibration text changed"
            return f"--{key.replace('_', '-')} changed ({was!r} -> {value!r})"
    old_sources = old.get("sources") or {}
    if set(old_sources) != set(new["sources"]):
        return f"the source's files changed ({', '.join(sorted(set(old_sources) ^ set(new['sources'])))})"
    for name, info in new["sources"].items():
        if old_sources[name] != info:
            return f"source file {name} changed (size or header)"
    if old.get("config_sha256") != new["config_sha256"]:
        return f"the source's {CONFIG_FILE} changed"
    if old != new:
        return "the manifest differs"
    return None


def _read_records(file) -> list[dict]:
    """Records of a journal opened r+b; a torn last line (a killed writer) is cut off."""
    file.seek(0)
    records, good = [], 0
    for line in file.read().split(b"\n")[:-1]:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
        good += len(line) + 1
    file.seek(good)
    file.truncate()
    return records


def _manifest_of(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.readline())["manifest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kept_folders(out_dir: str) -> list[tuple[Path, dict]]:
    """(temporary folder, manifest) of every resumable folder (``io.output.resumable``) beside OUT_DIR
    meant for it, newest first."""
    out = Path(out_dir)
    found = []
    try:
        siblings = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        siblings = []
    for folder in siblings:
        if folder.name.startswith(".") and TEMP_MARK in folder.name and resumable(folder):
            path = folder / RESUME_FILE
            old = _manifest_of(path)
            if isinstance(old, dict) and old.get("out") == out.name:
                found.append((path.stat().st_mtime, folder, old))
    return [(folder, old) for _, folder, old in sorted(found, key=lambda f: -f[0])]


def kept_note(folder: Path) -> str:
    """What an error or interruption message says about a run's finished work."""
    return f"finished work kept in {folder}: the same command with --resume continues it"


def _lock(file, folder: Path) -> None:
    try:
        import fcntl
    except ImportError:  # no advisory locks here (Windows): one run at a time is up to the user
        return
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.close()
        raise ExmyError(f"{folder}: another exmyconv process is still converting into it") from None


class Journal:
    """The journal of one temporary output folder: finished shards and curves, appended as they come."""

    def __init__(self, folder: Path, manifest: dict, records: list[dict] = (), file=None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.shards = {r["shard"]: r for r in records if "shard" in r}
        self.curves = {r["curve"]: (np.array(r["errors"], dtype=np.float64), r["measured_on"])
                       for r in records if "curve" in r}
        self._file = file
        self._synced = time.monotonic()

    @classmethod
    def resume(cls, out_dir: str, manifest: dict) -> "Journal | None":
        """The journal of an interrupted run into OUT_DIR with this manifest, locked; None if there is
        none. Refuses in one line when the newest one was made with other options or sources."""
        found = kept_folders(out_dir)
        if not found:
            return None
        matching = [folder for folder, old in found if difference(old, manifest) is None]
        if not matching:
            folder, old = found[0]
            raise ExmyError(f"cannot resume {out_dir}: {difference(old, manifest)} since the interrupted run; "
                            f"run it with the original options and source, or delete {folder} to start over")
        file = open(matching[0] / RESUME_FILE, "r+b")
        _lock(file, matching[0])
        return cls(matching[0], manifest, _read_records(file)[1:], file)

    @property
    def started(self) -> bool:
        """True once the journal exists: the folder is resumable."""
        return self._file is not None

    def _append(self, record: dict, sync: bool) -> None:
        if self._file is None:
            self._file = open(self.folder / RESUME_FILE, "xb")
            _lock(self._file, self.folder)
            self._file.write(json.dumps({"manifest": self.manifest}, separators=(",", ":")).encode() + b"\n")
        self._file.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self._file.flush()
        if sync or time.monotonic() - self._synced > SYNC_SECONDS:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def add_shard(self, record: dict) -> None:
        self.shards[record["shard"]] = record
        self._append(record, sync=True)

    def add_curve(self, name: str, errors: np.ndarray, measured_on: str) -> None:
        self.curves[name] = (np.asarray(errors, dtype=np.float64), measured_on)
        self._append({"curve": name, "errors": [float(e) for e in errors], "measured_on": measured_on}, sync=False)

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
