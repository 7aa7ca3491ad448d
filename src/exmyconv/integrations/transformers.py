"""Hugging Face transformers integration: exmy checkpoints load with ``from_pretrained``.

    import exmyconv                      # registers the quantization method "exmy" with transformers
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/model-e2m2", dtype=torch.bfloat16)

Registration goes through transformers' public API for third-party quantizers
(``transformers.quantizers.register_quantization_config("exmy")`` and ``register_quantizer("exmy")``).
The implementation (``ExmyConfig``, ``ExmyHfQuantizer``, ``ExmyLinear``, the torch dequantizer) is
in :mod:`exmyconv.integrations.transformers_impl` (on :mod:`exmyconv.torch`); docs/transformers.md describes what runs where.

Importing transformers takes seconds and ``import exmyconv`` must stay fast and must work without
transformers, so this module imports nothing heavy. It registers

- at once, when transformers' quantizer registry (``transformers.quantizers.auto``) is already
  imported;
- otherwise the moment that module is imported, through a small import hook. ``from_pretrained``
  imports it (``transformers.modeling_utils`` does) before it reads any ``quantization_config``,
  so the method is always known in time.

With a transformers outside ``SUPPORTED_TRANSFORMERS`` (or one without the loading API the quantizer
uses) the registration declines with one single-line warning: ``import exmyconv`` and transformers'
own imports never fail because of it, and plain models load as usual.

``register()`` registers explicitly (it imports transformers; raises ExmyError where the import
hook would decline). Names of the implementation
(``exmyconv.integrations.transformers.ExmyLinear``, ...) are importable from here too; touching one imports
:mod:`exmyconv.integrations.transformers_impl`, which registers as well.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

from ..errors import ExmyError

_REGISTRY_MODULE = "transformers.quantizers.auto"
_IMPL = "exmyconv.integrations.transformers_impl"
_EXPORTS = ("ExmyConfig", "ExmyHfQuantizer", "ExmyLinear", "dequantize", "unpack_codes", "QUANT_METHOD")
# The transformers releases the quantizer loads with (pyproject's demo extra and docs/transformers.md
# "Supported versions" say the same; CI tests both ends).
SUPPORTED_TRANSFORMERS = ">=5.16.1,<6"


def unsupported(version: str) -> str | None:
    """Why transformers ``version`` is outside SUPPORTED_TRANSFORMERS, or None when it is inside."""
    from packaging.specifiers import SpecifierSet  # a dependency of transformers
    from packaging.version import InvalidVersion

    try:
        if SpecifierSet(SUPPORTED_TRANSFORMERS).contains(version, prereleases=True):
            return None
    except InvalidVersion:
        pass
    return f"transformers {version} is outside the range exmyconv supports ({SUPPORTED_TRANSFORMERS})"


def register() -> None:
    """Register "exmy" with transformers now (imports transformers; safe to call again)."""
    importlib.import_module(_IMPL).register()


def is_registered() -> bool:
    """True when transformers' registry knows "exmy" (False if it is not imported yet)."""
    auto = sys.modules.get(_REGISTRY_MODULE)
    return auto is not None and "exmy" in getattr(auto, "AUTO_QUANTIZER_MAPPING", {})


def _register_from_hook() -> None:
    # exmyconv.integrations.transformers_impl registers itself at the end of its import. If it is in sys.modules it has
    # registered already, or it is being imported right now (its own import of transformers got
    # us here) and will register when it finishes: importing it again would see it half done.
    if _IMPL in sys.modules:
        return
    version = str(getattr(sys.modules.get("transformers"), "__version__", "unknown"))
    try:  # never break transformers' own import, nor the process: decline with one warning
        problem = unsupported(version)
        if problem is None:
            importlib.import_module(_IMPL)
    except Exception as err:
        problem = str(err) if isinstance(err, ExmyError) else (
            f"transformers {version}: {type(err).__name__}: {err} (supported: {SUPPORTED_TRANSFORMERS})")
    if problem is not None:
        message = " ".join(f"exmyconv: {problem}; the 'exmy' quantization method is not registered "
                           f"(exmy checkpoints will not load with from_pretrained)".split())
        try:
            warnings.warn(message, stacklevel=2)
        except Warning:  # warnings made errors (-W error) would raise inside transformers' import
            pass


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of transformers.quantizers.auto, then registers exmy."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _uninstall_hook()
        _register_from_hook()

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self._inner, name)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    """Finds transformers.quantizers.auto like the normal path finder, with our loader around it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None  # an unusual installation: the normal import proceeds; call register()
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


_HOOK = _RegistryFinder()


def _install_hook() -> None:
    if not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _HOOK)


def _uninstall_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegistryFinder)]


def __getattr__(name):  # PEP 562: exmyconv.integrations.transformers.ExmyLinear etc. load the implementation on first use
    if name in _EXPORTS:
        return getattr(importlib.import_module(_IMPL), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])


if _REGISTRY_MODULE in sys.modules:
    _register_from_hook()
else:
    _install_hook()
