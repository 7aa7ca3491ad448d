"""Names and per-tensor records of the .exmy layout (formats/SPEC.md section 4)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import ExmyError
from .exmy import ExMy, get_format
from .pack import row_bytes
from .quant import groups_of

VERSION = "1.1"
QUANT_METHOD = "exmy"
PACKED_SUFFIX = "_packed"
SCALE_SUFFIX = "_scale"
META_PREFIX = "exmy:"
# File names of a checkpoint folder (the one place they are spelled)
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
SEARCH_REPORT = "exmy_search.json"  # --format auto's sidecar
RESUME_FILE = "exmyconv-resume.jsonl"  # in a temporary output folder: makes it resumable (convert/resume.py)


def shard_name(i: int, n: int) -> str:
    return WEIGHTS_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def check_version(version: str, where: str) -> None:
    if version.split(".")[0] != VERSION.split(".")[0]:
        raise ExmyError(f"{where}: exmy layout version {version} is not supported (this reader: {VERSION})")


@dataclass
class TensorRecord:
    """One quantized tensor: the source tensor's name/shape/dtype and how it was stored."""

    name: str
    fmt: ExMy
    shape: tuple[int, ...]
    dtype: str  # source dtype
    group_size: int  # G (= K for one scale per row)
    rel_error: float = 0.0

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
        return (*self.shape[:-1], row_bytes(self.fmt, self.k))

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
        return META_PREFIX + self.name, text[:-1] + f',"rel_error":{self.rel_error:.6e}}}'

    @classmethod
    def from_metadata(cls, key: str, text: str) -> "TensorRecord":
        name = key[len(META_PREFIX):]
        try:
            d = json.loads(text)
            shape = tuple(d["shape"])
            record = cls(name, get_format(d["format"]), shape, str(d["dtype"]), int(d["group_size"]),
                         float(d.get("rel_error", 0.0)))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ExmyError(f"tensor {name!r}: bad exmy metadata ({err})") from None
        if not shape or not all(type(s) is int and s > 0 for s in shape) or not 1 <= record.group_size <= shape[-1]:
            raise ExmyError(f"tensor {name!r}: bad exmy metadata (shape {list(shape)}, group {record.group_size})")
        return record
