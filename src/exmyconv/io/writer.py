"""Streaming safetensors writer.

The tensor list (names, dtypes, shapes) is known before any data: the header is written first,
then each tensor's bytes in list order, in as many pieces as the caller likes. Metadata values
may be rewritten at the end as long as the header keeps its length (fixed-width numbers).
"""
from __future__ import annotations

import json
import os
from math import prod

import numpy as np

from ..format.dtypes import STORAGE


def _header_bytes(entries, metadata) -> bytes:
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = prod(shape) * STORAGE[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


class ShardWriter:
    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str]):
        self.path = path
        self.entries = entries
        self._sizes = [prod(shape) * STORAGE[dtype].itemsize for _, dtype, shape in entries]
        self._metadata = dict(metadata)
        self._header = _header_bytes(entries, self._metadata)
        self._file = open(path, "wb")
        self._file.write(len(self._header).to_bytes(8, "little") + self._header)
        self._index = 0  # entry being written
        self._written = 0  # bytes of it so far

    @property
    def data_bytes(self) -> int:
        return sum(self._sizes)

    def write(self, name: str, array: np.ndarray) -> None:
        """Append the next piece of tensor `name` (C order, already in its stored dtype)."""
        while self._index < len(self.entries) and self._written == self._sizes[self._index] \
                and self.entries[self._index][0] != name:
            self._index, self._written = self._index + 1, 0
        if self._index >= len(self.entries) or self.entries[self._index][0] != name:
            raise RuntimeError(f"write order: {name!r} is not the next tensor")
        data = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        if self._written + data.size > self._sizes[self._index]:
            raise RuntimeError(f"too many bytes for {name!r}")
        self._file.write(memoryview(data))
        self._written += data.size

    def close(self, metadata: dict[str, str] | None = None, dtypes: dict[str, str] | None = None) -> None:
        """Check every tensor is complete, then rewrite the header with final metadata values
        and dtypes of equal item size; it may shrink (padded with spaces), never grow."""
        if self._file.tell() != 8 + len(self._header) + self.data_bytes:
            raise RuntimeError(f"{self.path}: not every tensor was written")
        if metadata or dtypes:
            self._metadata.update(metadata or {})
            entries = [(n, (dtypes or {}).get(n, d), s) for n, d, s in self.entries]
            header = _header_bytes(entries, self._metadata)
            if len(header) > len(self._header) or any(
                    STORAGE[a[1]].itemsize != STORAGE[b[1]].itemsize for a, b in zip(entries, self.entries)):
                raise RuntimeError("header rewrite would move the data")
            self._file.seek(8)
            self._file.write(header.ljust(len(self._header)))
        self._file.close()

    def abort(self) -> None:
        self._file.close()
