"""Names and per-tensor records of the .exmy layout (formats/SPEC.md section 4).

Reading a record back, and every other rule of what a reader accepts, is :mod:`exmyconv.io.validate`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from . import dtypes
from .exmy import ExMy
from .pack import LAYOUT, row_bytes, upgrade
from .quant import groups_of

VERSION = f"{LAYOUT}.0"  # written; readers read every 1.x and 2.x (formats/SPEC.md section 5)
READ_MAJORS = (1, LAYOUT)
QUANT_METHOD = "exmy"
PACKED_SUFFIX = "_packed"
SCALE_SUFFIX = "_scale"
META_PREFIX = "exmy:"
# File names of a checkpoint folder (the one place they are spelled)
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
SEARCH_REPORT = "exmy_search.json"  # --format auto's sidecar
# A converted config.json carries GUARD_KEY: GUARD_VALUE (formats/SPEC.md section 4) unless the source
# config set GUARD_KEY itself. transformers without exmyconv's quantizer refuses that value with an error
# that quotes it, instead of building the model with random weights in place of the quantized ones and
# only warning; exmyconv's quantizer (and `exmyconv dequantize`) takes it out again.
GUARD_KEY = "attn_implementation"
GUARD_VALUE = "exmy checkpoint: pip install exmyconv, then import exmyconv before from_pretrained"
RESUME_FILE = "exmyconv-resume.jsonl"  # in a temporary output folder: makes it resumable (convert/resume.py)


def shard_name(i: int, n: int) -> str:
    return WEIGHTS_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def nominal_bits(fmt: ExMy, k: int, group_size: int | None, scale_bits: int = 16) -> float:
    """Bits per weight of a row of K weights without the layout's padding (section 3: rows padded to a
    multiple of 32 weights, the shared-bit plane to 4 bytes): the format's bits, a shared bit counted
    once per ``share`` weights, plus a 16-bit (or 8-bit) scale per group."""
    return fmt.bits_per_weight + scale_bits * groups_of(k, group_size)[1] / k


@dataclass
class TensorRecord:
    """One quantized tensor: the source tensor's name/shape/dtype and how it was stored."""

    name: str
    fmt: ExMy
    shape: tuple[int, ...]
    dtype: str  # source dtype
    group_size: int  # G (= K for one scale per row)
    rel_error: float = 0.0
    layout: int = LAYOUT  # major version of the file it was read from: how its rows are padded
    scale_exp: int | None = None  # 8-bit scales (F8_E4M3, since 2.0): the tensor's power of two; else None

    @property
    def k(self) -> int:
        return self.shape[-1]

    @property
    def ngroups(self) -> int:
        return groups_of(self.k, self.group_size)[1]

    @property
    def packed_name(self) -> str:
        return self.name + PACKED_SUFFIX

    @property
    def scale_name(self) -> str:
        return self.name + SCALE_SUFFIX

    @property
    def packed_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-1], row_bytes(self.fmt, self.k, self.layout))

    @property
    def scale_bytes(self) -> int:
        """Bytes per stored scale: 1 for 8-bit scales, else 2 (F16/BF16)."""
        return 1 if self.scale_exp is not None else 2

    @property
    def nominal_bits(self) -> float:
        """Bits per weight without the layout's padding (:func:`nominal_bits` with this record's scales)."""
        return nominal_bits(self.fmt, self.k, self.group_size, 8 * self.scale_bytes)

    def scale_values(self, stored: np.ndarray) -> np.ndarray:
        """A stored 8-bit ``T_scale`` (bytes) as float32 scale values: e4m3 value times 2^scale_exp
        (exact). Torch tensors: :func:`exmyconv.torch.codec.scale_values`."""
        return dtypes.to_float32(stored, "F8_E4M3") * np.float32(2.0 ** self.scale_exp)

    @property
    def current_bytes(self) -> bool:
        """The stored payload already has the current layout's bytes (always for 2.x; for 1.x when no
        padding differs, e.g. K a multiple of 128 and no shared plane)."""
        return self.packed_shape[-1] == row_bytes(self.fmt, self.k)

    def payload(self, stored):
        """The stored ``T_packed`` (numpy or torch) in the current layout: every consumer of packed
        weights takes them through here, so that 1.x checkpoints keep loading."""
        return upgrade(stored, self.fmt, self.k, self.layout)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-1], self.ngroups)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def metadata(self) -> tuple[str, str]:
        # rel_error has a fixed width so the header can be rewritten in place once it is known.
        text = json.dumps({"format": self.fmt.name, "shape": list(self.shape), "dtype": self.dtype,
                           "group_size": self.group_size}, separators=(",", ":"))
        if self.scale_exp is not None:  # (fixed width too: known only once the tensor is read)
            text = text[:-1] + f',"scale_exp":{self.scale_exp:>4}}}'
        return META_PREFIX + self.name, text[:-1] + f',"rel_error":{self.rel_error:.6e}}}'
