"""A checkpoint folder on disk: its safetensors files (checked against the index), JSON files, pickles refused."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ExmyError
from ..format.layout import INDEX_FILE

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExmyError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ExmyError(f"{path}: expected a JSON object")
    return data


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked against its index if any."""
    if not root.exists():
        raise ExmyError(f"{root}: no such directory")
    if not root.is_dir():
        raise ExmyError(f"{root}: not a directory")
    index = root / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ExmyError(f"{index}: no weight_map")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or "/" in name or not (root / name).is_file():
                raise ExmyError(f"{index}: names shard {name!r}, which is missing")
        return [root / n for n in names]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ExmyError(f"{root}: only pickle checkpoints ({', '.join(pickles)}); exmyconv never "
                            "unpickles files: convert them to safetensors with a tool you trust")
        raise ExmyError(f"{root}: no .safetensors files")
    return files
