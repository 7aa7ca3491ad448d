"""Read an exmy checkpoint (or any safetensors checkpoint) back: validate, dequantize."""
from __future__ import annotations

import numpy as np

from ..format import dtypes
from ..errors import ExmyError
from ..format.layout import CONFIG_FILE, META_PREFIX, PACKED_SUFFIX, SCALE_SUFFIX, TensorRecord, check_version
from ..format.pack import unpack_codes
from ..format.quant import SMALLEST_NORMAL, dequantize_codes
from .folder import read_json, weight_files
from .source import resolve
from .reader import SafetensorsFile, TensorInfo


class Checkpoint:
    """All tensors of a checkpoint directory or single .safetensors file.

    ``records``: quantized tensors (name -> TensorRecord, file); ``plain``: everything else.
    ``problems``: integrity findings; ``check()`` raises the first one.
    """

    def __init__(self, path: str):
        self.path = resolve(path)
        if self.path.is_file():
            paths, root = [self.path], self.path.parent
            self.config = None
        else:
            paths, root = weight_files(self.path), self.path
            cfg = root / CONFIG_FILE
            self.config = read_json(cfg) if cfg.is_file() else None
        self.files: list[SafetensorsFile] = []
        try:
            self.files = [SafetensorsFile(p) for p in paths]
        except BaseException:
            self.close()
            raise
        self.records: dict[str, tuple[TensorRecord, SafetensorsFile]] = {}
        self.plain: dict[str, tuple[TensorInfo, SafetensorsFile]] = {}
        self.problems: list[str] = []
        for f in self.files:
            self._scan(f)

    def _problem(self, text: str) -> None:
        self.problems.append(text)

    def _scan(self, f: SafetensorsFile) -> None:
        keys = [k for k in f.metadata if k.startswith(META_PREFIX)]
        if keys:
            try:
                check_version(f.metadata.get("exmy_version", "?"), str(f.path))
            except ExmyError as err:
                self._problem(str(err))
                return
        claimed = set()
        for key in keys:
            try:
                record = TensorRecord.from_metadata(key, f.metadata[key])
            except ExmyError as err:
                self._problem(f"{f.path.name}: {err}")
                continue
            claimed |= {record.packed_name, record.scale_name}
            packed, scale = f.tensors.get(record.packed_name), f.tensors.get(record.scale_name)
            if packed is None or scale is None:
                self._problem(f"{f.path.name}: {record.name}: packed or scale tensor missing")
            elif packed.dtype != "U8" or packed.shape != record.packed_shape:
                self._problem(f"{f.path.name}: {record.packed_name}: {packed.dtype}{list(packed.shape)}, "
                              f"expected U8{list(record.packed_shape)}")
            elif scale.dtype not in ("F16", "BF16") or scale.shape != record.scale_shape:
                self._problem(f"{f.path.name}: {record.scale_name}: {scale.dtype}{list(scale.shape)}, "
                              f"expected F16/BF16{list(record.scale_shape)}")
            else:
                self.records[record.name] = (record, f)
        for name, info in f.tensors.items():
            if name in claimed:
                continue
            if name.endswith((PACKED_SUFFIX, SCALE_SUFFIX)) and keys:
                self._problem(f"{f.path.name}: {name} has no exmy metadata")
            self.plain[name] = (info, f)

    def check(self) -> "Checkpoint":
        if self.problems:
            raise ExmyError(f"{self.path}: damaged exmy checkpoint: {self.problems[0]}")
        return self

    def scales(self, name: str) -> tuple[np.ndarray, str]:
        record, f = self.records[name]
        dtype = f.tensors[record.scale_name].dtype
        return dtypes.to_float32(f.read(record.scale_name), dtype), dtype

    def check_scales(self, name: str) -> str | None:
        s, dtype = self.scales(name)
        if not (np.isfinite(s).all() and (s >= SMALLEST_NORMAL[dtype]).all()):
            return f"{name}: scales contain zero, subnormal, infinite or NaN values"
        return None

    def dequantize(self, name: str, out_dtype: str = "F32") -> np.ndarray:
        """One quantized tensor as float32 values, rounded to out_dtype (F32/F16/BF16)."""
        record, f = self.records[name]
        bad = self.check_scales(name)
        if bad:
            raise ExmyError(f"{f.path}: damaged exmy checkpoint: {bad}")
        scales, _ = self.scales(name)
        codes = unpack_codes(f.read(record.packed_name), record.fmt, record.k)
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
