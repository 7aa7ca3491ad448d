"""Read a converted checkpoint (or any safetensors checkpoint) back: open, validate, dequantize.

``open_checkpoint(path)`` is the entry point of every reader of a converted checkpoint: the CLI
(``inspect``, ``verify``, ``dequantize``), ``exmyconv.load_state_dict``, the transformers loader and
engine integrations (the vLLM plugin). What is valid is decided by :mod:`exmyconv.io.validate` alone.
"""
from __future__ import annotations

import numpy as np

from ..format import dtypes
from ..errors import ExmyError
from ..format.layout import CONFIG_FILE, TensorRecord
from ..format.pack import unpack_codes
from ..format.quant import dequantize_codes
from .source import resolve
from .reader import SafetensorsFile, TensorInfo
from .validate import exmy_config, read_config, validate_files, weight_files


class Checkpoint:
    """All tensors of a checkpoint directory or single .safetensors file, validated.

    ``records``: quantized tensors (name -> TensorRecord, file); ``plain``: everything else;
    ``problems``: what :func:`exmyconv.io.validate.validate_files` found (``check()`` raises the first);
    ``config``: config.json (None for a single file or a folder without one).
    """

    def __init__(self, path: str):
        self.path = resolve(path)
        weight_map, self.config = None, None
        if self.path.is_file():
            paths = [self.path]
        else:
            if self.path.is_dir():
                self.config = read_config(self.path / CONFIG_FILE)
            paths, weight_map = weight_files(self.path)
        self.files: list[SafetensorsFile] = []
        try:
            for p in paths:
                self.files.append(SafetensorsFile(p))
            contents = validate_files(self.files, self.config, weight_map, where=str(self.path / CONFIG_FILE))
        except BaseException:
            self.close()
            raise
        self.records: dict[str, tuple[TensorRecord, SafetensorsFile]] = contents.records
        self.plain: dict[str, tuple[TensorInfo, SafetensorsFile]] = contents.plain
        self.problems: list[str] = contents.problems
        self.bad_scales: set[str] = contents.bad_scales

    @property
    def is_exmy(self) -> bool:
        """Holds exmy records, or its config.json says quant_method "exmy"."""
        return bool(self.records) or exmy_config(self.config) is not None

    def check(self) -> "Checkpoint":
        """Raise ExmyError (one line: the first problem) unless the checkpoint is valid."""
        if self.problems:
            what = "damaged exmy checkpoint" if self.is_exmy else "invalid checkpoint"
            raise ExmyError(f"{self.path}: {what}: {self.problems[0]}")
        return self

    def scales(self, name: str) -> tuple[np.ndarray, str]:
        """(float32 scale values, stored dtype): 8-bit scales ("F8_E4M3") come back times their power of two."""
        record, f = self.records[name]
        dtype = f.tensors[record.scale_name].dtype
        stored = f.read(record.scale_name)
        if record.scale_exp is not None:
            return record.scale_values(stored), dtype
        return dtypes.to_float32(stored, dtype), dtype

    def payload(self, name: str) -> np.ndarray:
        """The packed codes of a quantized tensor in the current layout (1.x rows re-padded)."""
        record, f = self.records[name]
        return record.payload(f.read(record.packed_name))

    def dequantize(self, name: str, out_dtype: str = "F32") -> np.ndarray:
        """One quantized tensor as float32 values, rounded to out_dtype (F32/F16/BF16)."""
        record, f = self.records[name]
        if name in self.bad_scales:
            raise ExmyError(f"{f.path}: damaged exmy checkpoint: {name}: invalid scales")
        scales, _ = self.scales(name)
        codes = unpack_codes(self.payload(name), record.fmt, record.k)
        return dtypes.round_to(dequantize_codes(codes, scales, record.fmt, record.group_size), out_dtype)

    def names(self) -> list[str]:
        return sorted([*self.records, *self.plain])

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_checkpoint(path: str) -> Checkpoint:
    """A checkpoint folder or single .safetensors file, opened and validated.

    Raises :class:`~exmyconv.errors.ExmyError` with one line (the first problem) unless every rule of
    :mod:`exmyconv.io.validate` holds. This is the one call an engine integration (e.g. the vLLM plugin)
    makes before it trusts a checkpoint, so that it accepts and refuses exactly what the CLI,
    ``load_state_dict`` and the transformers loader do. Close the result (it is a context manager).
    """
    ckpt = Checkpoint(path)
    try:
        return ckpt.check()
    except BaseException:
        ckpt.close()
        raise
