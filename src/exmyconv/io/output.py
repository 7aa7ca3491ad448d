"""Writing a checkpoint folder safely: a temporary sibling renamed into place on success."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..errors import ExmyError
from ..format.layout import CONFIG_FILE, INDEX_FILE, RESUME_FILE, SEARCH_REPORT, shard_name
from .folder import PICKLE_SUFFIXES

NOT_COPIED = (CONFIG_FILE, INDEX_FILE, SEARCH_REPORT)  # top-level files each writer makes itself


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


def resumable(folder: Path) -> bool:
    """A temporary folder holding RESUME_FILE keeps an interrupted run's finished work
    (convert/resume.py): it is never removed automatically."""
    return (folder / RESUME_FILE).is_file()


@contextmanager
def atomic_dir(out_dir: str, source_root: Path, overwrite: bool, reuse: Path | None = None):
    """Yield a temporary sibling of OUT_DIR (``reuse``: an interrupted run's, to continue in); on
    success it replaces OUT_DIR, on any failure (Ctrl-C included) it and the parent folders created
    for it are removed, unless it is resumable (then all stay)."""
    out = Path(out_dir)
    _check_out_dir(out, source_root, overwrite)
    created = []  # ancestors that do not exist yet, deepest first
    for parent in out.absolute().parents:
        if parent.exists():
            break
        created.append(parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.exmyconv-tmp-{os.getpid()}"
    while reuse is None and resumable(tmp):  # a dead run's that had our pid: kept
        tmp = tmp.with_name(tmp.name + "+")
    if reuse is not None:
        tmp = reuse
    elif tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(exist_ok=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        if resumable(tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:
            try:
                parent.rmdir()
            except OSError:
                break
        raise
