"""Conversion on a Ray cluster: the single process's units of work, run as Ray tasks.

``pipeline.convert(..., runner=RayRunner(address, workers))`` keeps the driver's part as it is:
open and validate the source, plan, tie, calibrate, allocate formats (``--format auto``), then
write the index, config and search report and rename the folder into place. What it hands to
``runner.measure`` and ``runner.write`` runs here as tasks:

- a task gets small records only — a tensor's file path, its TensorInfo and TensorRecord, the
  options, calibration importances (and Hessians) — opens the source files itself (memory-mapped, as the single
  process does), and returns small records: a measured error curve per tensor (``--format auto``'s
  first pass) or a finished shard's journal record (the second pass, which writes the shard into
  the temporary folder). Weights never go through the object store or the driver;
- tasks call the very functions the single process calls (``pipeline.measure_items``,
  ``pipeline.write_unit``) on the same plan (``units.py``), so the output is byte-identical;
- a worker that dies is replaced and its task retried (``RETRIES`` times), as is a task whose
  file I/O failed; an error in the data (a NaN, a changed source) stops the job at once. Either
  way the error names the tensor, the driver cancels what is still running, and the temporary
  folder keeps every finished shard for ``--resume`` (nothing reaches OUT_DIR);
- one progress bar over bytes: tasks report their progress to a small actor that the driver polls.

Multi-node use needs the source and OUT_DIR's parent on a filesystem every node mounts at the same
path; the driver ships this package to the cluster (``runtime_env`` ``py_modules``) so tasks run the
driver's code. See docs/scale.md.

Imports: ``pipeline``, ``search``, ``units`` (this folder), ``io.reader``, ``errors``; Ray lazily.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import ExmyError
from ..io.reader import SafetensorsFile
from . import pipeline, units

RETRIES = 3  # extra attempts of a task whose worker died or whose file I/O failed
TASK_THREADS = 4  # most threads (and CPUs) of one writing task, when there are fewer shards than CPUs
MEASURE_BYTES = 256 << 20  # source bytes per --format auto measuring task (at most)
REPORT_BYTES = 16 << 20  # a task tells the progress actor at least this often (bytes) ...
REPORT_SECONDS = 0.5  # ... or this often (seconds)


class Retryable(Exception):
    """A task failure worth another attempt (file I/O, memory); Ray retries these."""


class Progress:
    """The Ray actor that collects the bytes each task has done (the driver polls it)."""

    def __init__(self):
        self.done = {}

    def report(self, key: str, nbytes: int) -> None:
        self.done[key] = max(self.done.get(key, 0), nbytes)

    def snapshot(self) -> dict:
        return dict(self.done)


class _Reporter:
    """What a task gives pipeline functions as their progress bar: bytes, sent on to the actor."""

    def __init__(self, actor, key: str):
        self.actor, self.key = actor, key
        self.n, self._sent, self._when = 0, 0, time.monotonic()

    def update(self, nbytes: int) -> None:
        self.n += nbytes
        if self.n - self._sent >= REPORT_BYTES or time.monotonic() - self._when >= REPORT_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.n != self._sent:
            self.actor.report.remote(self.key, self.n)
            self._sent, self._when = self.n, time.monotonic()

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass


def spec(item: pipeline.Item) -> tuple:
    """An item as a task receives it: where to read it and what to make of it (no weights)."""
    return str(item.file.path), item.info, item.record, item.clip_search, item.importance, item.hessian


def open_items(specs: list[tuple]) -> tuple[list[pipeline.Item], list[SafetensorsFile]]:
    """Items again, on a worker: each source file opened (and its header checked) once."""
    files: dict[str, SafetensorsFile] = {}
    items = []
    try:
        for path, info, record, clip, importance, hessian in specs:
            if path not in files:
                files[path] = SafetensorsFile(path)
            if files[path].tensors.get(info.name) != info:
                raise ExmyError(f"{path}: tensor {info.name!r} changed since the conversion was planned")
            items.append(pipeline.Item(info, files[path], record, clip_search=clip, importance=importance,
                                       hessian=hessian))
    except BaseException:
        for f in files.values():
            f.close()
        raise
    return items, list(files.values())


def current_tensor(items: list[pipeline.Item], done: int) -> str:
    """The tensor a unit was at after ``done`` source bytes (tensors are done in order)."""
    total = 0
    for item in items:
        total += item.info.nbytes
        if total > done:
            return item.info.name
    return items[-1].info.name if items else "?"


def _task(work, specs: list[tuple], actor, key: str, threads: int = 1):
    """Run ``work(items, progress)`` on a worker with ``threads`` chunk threads (the CPUs Ray gave
    the task; output bytes do not depend on them); a failure says which tensor it was at."""
    pipeline.WORKERS = threads  # this worker process runs one task at a time
    items, files = open_items(specs)
    progress = _Reporter(actor, key)
    try:
        return work(items, progress)
    except Exception as err:
        name = current_tensor(items, progress.n)
        text = str(err) if name in str(err) else f"tensor {name!r}: {type(err).__name__}: {err}"
        if isinstance(err, (OSError, MemoryError)):
            raise Retryable(text) from None
        raise ExmyError(text) from None
    finally:
        progress.flush()
        for f in files:
            f.close()


def measure_task(specs, candidates, actor, key):
    """--format auto's first pass for one unit: [(tensor name, error curve, where measured)]."""
    def work(items, progress):
        return [(item.info.name, errors, where)
                for item, errors, where in pipeline.measure_items(items, candidates, progress)]
    return _task(work, specs, actor, key)


def write_task(folder, name, specs, opts, expect, actor, key, threads):
    """Write (or, if ``expect`` still matches, keep) one output shard: its journal record."""
    return _task(lambda items, progress: pipeline.write_unit(Path(folder), name, items, opts, progress, expect),
                 specs, actor, key, threads)


class RayRunner:
    """Runs the units of work of ``pipeline.convert`` as Ray tasks (see the module docstring).

    ``address``: a Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``); None starts a local
    one with ``workers`` CPUs (default: this machine's). ``workers``: CPUs in use at once (default:
    the cluster's). A task takes one CPU; a writing task takes up to TASK_THREADS when there are
    fewer shards than CPUs (a thread per CPU)."""

    def __init__(self, address: str | None = None, workers: int | None = None):
        if importlib.util.find_spec("ray") is None:
            raise ExmyError("--ray needs Ray: pip install 'exmyconv[ray]'")
        if workers is not None and workers < 1:
            raise ExmyError(f"--workers must be positive, got {workers}")
        self.address, self.workers = address, workers
        self._actor = None
        self._own_cluster = False

    @contextmanager
    def session(self):
        """Connect to (or start) the cluster for one conversion; a cluster we started is stopped."""
        import ray

        started = not ray.is_initialized()
        self._own_cluster = started and not self.address
        if started:
            quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
            # ray.init makes SIGTERM call sys.exit; ours (io.output.atomic_dir) keeps the interrupted
            # run's resumable folder and exits 143 with one line, so it is put back
            main = threading.current_thread() is threading.main_thread()
            sigterm = signal.getsignal(signal.SIGTERM) if main else None
            try:
                if self.address:
                    package = Path(__file__).resolve().parents[1]
                    ray.init(address=self.address, runtime_env={"py_modules": [str(package)]}, **quiet)
                else:
                    ray.init(num_cpus=self.workers or os.cpu_count(), include_dashboard=False, **quiet)
            except Exception as err:  # noqa: BLE001 - any way of not getting a cluster is one line
                raise ExmyError(f"cannot start or reach a Ray cluster at {self.address or 'this machine'}: "
                                f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
            finally:
                if main and sigterm is not None:
                    signal.signal(signal.SIGTERM, sigterm)
        try:
            resources = ray.cluster_resources()
            self._slots = self.workers or max(1, int(resources.get("CPU", 1)))
            self._gpus = resources.get("GPU", 0) > 0
            self._node_cpus = max([int(node.get("Resources", {}).get("CPU", 1))
                                   for node in ray.nodes() if node.get("Alive")] or [1])
            self._actor = ray.remote(num_cpus=0)(Progress).remote()
            options = {"num_cpus": 1, "max_retries": RETRIES, "retry_exceptions": [Retryable]}
            self._measure = ray.remote(**options)(measure_task).options(num_gpus=1 if self._gpus else 0)
            self._write = ray.remote(**options)(write_task)
            yield self
        finally:
            if self._actor is not None:
                ray.kill(self._actor)
                self._actor = None
            if started:
                ray.shutdown()

    def measure(self, items: list[pipeline.Item], candidates, progress):
        """(item, error curve, where measured) for each item, in the order tasks finish."""
        by_name = {item.info.name: item for item in items}
        target = max(1, min(MEASURE_BYTES, sum(i.info.nbytes for i in items) // (4 * self._slots)))
        jobs = []
        blocks = [range(j, j + 1) for j in range(len(items))]  # curves are per tensor: fused partners may part
        for n, unit in enumerate(units.pack_blocks(blocks, [i.info.nbytes for i in items], target)):
            unit_items = [items[j] for j in unit]
            if unit_items:
                jobs.append((f"m{n}", unit_items, lambda key, specs: self._measure.remote(
                    specs, candidates, self._actor, key)))
        for _, curves in self._run(jobs, progress):
            for name, errors, where in curves:
                yield by_name[name], errors, where

    def write(self, folder: Path, shards: list[tuple[str, list[pipeline.Item]]], opts, progress, expected):
        """(shard number, journal record) for each shard, in the order tasks finish."""
        threads = max(1, min(TASK_THREADS, self._node_cpus, self._slots // max(1, len(shards))))
        remote = self._write.options(num_cpus=threads)
        jobs = []
        for n, (name, items) in enumerate(shards):
            jobs.append((n, items, lambda key, specs, name=name, expect=expected[n]: remote.remote(
                str(folder), name, specs, opts, expect, self._actor, key, threads)))
        names = dict(enumerate(name for name, _ in shards))
        for n, record in self._run(jobs, progress, names, threads):
            yield n, record

    def _run(self, jobs: list[tuple], progress, labels: dict | None = None, threads: int = 1):
        """Submit jobs (key, items, submit(key, specs)), largest first, ``workers // threads`` at a time;
        yield (key, result) as they finish, keep the progress bar up to date; on any failure or
        when the caller stops, cancel what is still running."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        queue = sorted(jobs, key=lambda job: -sum(i.info.nbytes for i in job[1]))
        size = {str(key): sum(i.info.nbytes for i in items) for key, items, _ in jobs}
        running: dict = {}  # ref -> (key, items)
        finished, shown = 0, 0
        try:
            while queue or running:
                while queue and len(running) < max(1, self._slots // threads):
                    key, items, submit = queue.pop(0)
                    running[submit(str(key), [spec(i) for i in items])] = (key, items)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=REPORT_SECONDS)
                for ref in ready:
                    key, items = running.pop(ref)
                    try:
                        result = ray.get(ref)
                    except RayTaskError as err:
                        cause = getattr(err, "cause", None) or err
                        raise ExmyError(self._where(key, labels) + str(cause).strip().splitlines()[0]) from None
                    except RayError as err:
                        done = self._snapshot().get(str(key), 0)
                        raise ExmyError(f"{self._where(key, labels)}tensor {current_tensor(items, done)!r}: "
                                        f"{type(err).__name__} after {RETRIES + 1} attempts "
                                        f"({str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
                    finished += size[str(key)]
                    yield key, result
                snapshot = self._snapshot()
                now = finished + sum(snapshot.get(str(key), 0) for key, _ in running.values())
                if now > shown:
                    progress.update(now - shown)
                    shown = now
        finally:  # nothing of this job may go on writing once the driver has given up on it
            # a local cluster this job started is shut down next (session), which ends its workers;
            # force-cancelling them first raced with Ray's own bookkeeping on Ctrl-C (a failed check
            # inside Ray 2.60's core worker, docs/scale.md), so only a cluster we joined is cancelled
            if not self._own_cluster:
                for ref in running:
                    ray.cancel(ref, force=True)
                if running:
                    ray.wait(list(running), num_returns=len(running), timeout=60)

    def _snapshot(self) -> dict:
        import ray
        from ray.exceptions import RayError

        try:
            return ray.get(self._actor.snapshot.remote(), timeout=10)
        except RayError:  # progress is best effort: a lost actor must not stop the job
            return {}

    @staticmethod
    def _where(key, labels: dict | None) -> str:
        return f"{labels[key]}: " if labels else ""
