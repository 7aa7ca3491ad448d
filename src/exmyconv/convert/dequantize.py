"""`exmyconv dequantize`: an exmy checkpoint back to a plain fp16/bf16/fp32 safetensors folder."""
from __future__ import annotations

import json

import numpy as np
from tqdm import tqdm

from ..format import dtypes
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..errors import ExmyError
from ..format.layout import CONFIG_FILE, GUARD_KEY, GUARD_VALUE, shard_name
from ..io.output import atomic_dir, copy_side_files, write_index
from ..format.pack import unpack_codes
from ..format.quant import dequantize_codes
from ..io.writer import ShardWriter

OUT_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
ROWS_ELEMENTS = 1 << 22  # dequantize this many elements at a time


def _default_dtype(config: dict | None) -> str:
    name = (config or {}).get("torch_dtype") or (config or {}).get("dtype")
    return name if name in OUT_DTYPES else "float16"


def dequantize_checkpoint(src: str, dst: str, dtype: str | None = None, max_shard_size: int = 5 * 10**9,
                          overwrite: bool = False, progress: bool | None = None) -> dict:
    """Write DST with every quantized tensor dequantized to ``dtype`` (default: the config's
    torch_dtype if fp16/bf16/fp32, else float16); unquantized tensors are copied as stored."""
    with open_checkpoint(src) as ckpt:
        if not ckpt.path.is_dir():
            raise ExmyError(f"{src}: dequantize needs a checkpoint folder")
        dtype = dtype or _default_dtype(ckpt.config)
        if dtype not in OUT_DTYPES:
            raise ExmyError(f"unknown --dtype {dtype!r}: use {', '.join(OUT_DTYPES)}")
        code = OUT_DTYPES[dtype]
        entries = []  # (name, stored dtype, shape, bytes)
        for name in ckpt.names():
            if name in ckpt.records:
                r = ckpt.records[name][0]
                entries.append((name, code, r.shape, r.numel * dtypes.STORAGE[code].itemsize))
            else:
                info = ckpt.plain[name][0]
                entries.append((name, info.dtype, info.shape, info.nbytes))
        shards, size = [[]], 0
        for e in entries:
            if shards[-1] and size + e[3] > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += e[3]
        with atomic_dir(dst, ckpt.path, overwrite) as tmp:
            with tqdm(total=sum(e[3] for e in entries), unit="B", unit_scale=True, leave=False,
                      disable=not progress if progress is not None else None) as bar:
                for n, shard in enumerate(shards):
                    writer = ShardWriter(tmp / shard_name(n, len(shards)), [e[:3] for e in shard], {"format": "pt"})
                    try:
                        for name, _, _, nbytes in shard:
                            _write_tensor(ckpt, name, code, writer)
                            bar.update(nbytes)
                        writer.close()
                    except BaseException:
                        writer.abort()
                        raise
            write_index(tmp, [[e[0] for e in shard] for shard in shards], sum(e[3] for e in entries))
            config = dict(ckpt.config or {})
            config.pop("quantization_config", None)
            if config.get(GUARD_KEY) == GUARD_VALUE:
                del config[GUARD_KEY]
            if "dtype" in config or "torch_dtype" not in config:
                config["dtype"] = dtype
            else:
                config["torch_dtype"] = dtype
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            copy_side_files(ckpt.path, tmp)
        return {"out_dir": str(dst), "dtype": dtype, "tensors": len(entries), "dequantized": len(ckpt.records),
                "shards": len(shards), "bytes": sum(e[3] for e in entries)}


def _write_tensor(ckpt: Checkpoint, name: str, code: str, writer: ShardWriter) -> None:
    if name not in ckpt.records:
        stored = ckpt.plain[name][1].read(name).reshape(-1).view(np.uint8)
        writer.write(name, stored)
        return
    record, f = ckpt.records[name]
    scales, _ = ckpt.scales(name)
    scales = scales.reshape(-1, record.ngroups)
    packed = ckpt.payload(name)
    packed = packed.reshape(-1, packed.shape[-1])
    step = max(1, ROWS_ELEMENTS // record.k)
    for start in range(0, packed.shape[0], step):
        codes = unpack_codes(packed[start:start + step], record.fmt, record.k)
        values = dequantize_codes(codes, scales[start:start + step], record.fmt, record.group_size)
        writer.write(name, dtypes.store(values, code))
