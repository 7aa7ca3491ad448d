"""Memory-mapped safetensors reader (numpy).

The header is read and checked (:func:`exmyconv.io.validate.safetensors_header`) before any tensor is
touched; a lying header can never make us read past the file or allocate more than the file holds,
and only regular files are opened (a FIFO never blocks).
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

from ..format.dtypes import STORAGE
from ..errors import ExmyError
from .validate import MAX_HEADER, TensorInfo, open_regular, safetensors_header

__all__ = ["SafetensorsFile", "TensorInfo"]


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None
        try:
            self._file = open_regular(self.path)
            self.size = os.fstat(self._file.fileno()).st_size
            self.metadata, self.tensors = self._parse_header()
        except OSError as err:
            self.close()
            raise ExmyError(f"{self.path}: cannot read: {err.strerror or err}") from None
        except BaseException:
            self.close()
            raise

    def _parse_header(self):
        if self.size < 8:
            raise ExmyError(f"{self.path}: not a valid safetensors file: only {self.size} bytes")
        (n,) = struct.unpack("<Q", self._file.read(8))
        if n > min(MAX_HEADER, self.size - 8):
            raise ExmyError(f"{self.path}: not a valid safetensors file: header length {n} exceeds the file "
                            f"({self.size} bytes)")
        return safetensors_header(self._file.read(n), self.size - 8 - n, str(self.path))

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
