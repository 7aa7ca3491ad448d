"""Validating, memory-mapped safetensors reader (numpy).

Everything in the header is checked before any tensor is touched; a lying header can never
make us read past the file or allocate more than the file holds.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from ..format.dtypes import STORAGE
from ..errors import ExmyError

MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None
        try:
            self._file = open(self.path, "rb")
            self.size = os.fstat(self._file.fileno()).st_size
            self.metadata, self.tensors = self._parse_header()
        except OSError as err:
            self.close()
            raise ExmyError(f"{self.path}: cannot read: {err.strerror or err}") from None
        except ExmyError:
            self.close()
            raise

    def _bad(self, why: str) -> ExmyError:
        return ExmyError(f"{self.path}: not a valid safetensors file: {why}")

    def _parse_header(self):
        if self.size < 8:
            raise self._bad(f"only {self.size} bytes")
        (n,) = struct.unpack("<Q", self._file.read(8))
        if n > min(MAX_HEADER, self.size - 8):
            raise self._bad(f"header length {n} exceeds the file ({self.size} bytes)")
        try:
            header = json.loads(self._file.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._bad(f"header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        data_start, data_size = 8 + n, self.size - 8 - n
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._bad("__metadata__ must map strings to strings")
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            tensors[name] = self._parse_entry(name, entry, data_start, data_size)
        spans = sorted((t.begin, t.begin + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise self._bad(f"tensors {first!r} and {second!r} overlap")
        return metadata, tensors

    def _parse_entry(self, name, entry, data_start, data_size) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise self._bad(f"tensor {name!r} has no dtype")
        if dtype not in STORAGE:
            raise ExmyError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise self._bad(f"tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise self._bad(f"tensor {name!r} has data offsets {offsets!r} outside the file "
                            f"({data_size} data bytes): truncated?")
        nbytes = prod(shape) * STORAGE[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise self._bad(f"tensor {name!r} holds {offsets[1] - offsets[0]} bytes, "
                            f"its shape {shape} needs {nbytes}")
        return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], nbytes)

    def read(self, name: str) -> np.ndarray:
        """The stored array (read-only, memory-mapped; bf16 comes back as uint16 bits)."""
        info = self.tensors[name]
        dt = STORAGE[info.dtype]
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype=dt)
        page = mmap.ALLOCATIONGRANULARITY
        start = info.begin - info.begin % page
        mapped = mmap.mmap(self._file.fileno(), info.begin + info.nbytes - start,
                           offset=start, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, dtype=dt, count=info.nbytes // dt.itemsize,
                             offset=info.begin - start).reshape(info.shape)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
