"""The one GPU probe: can exmyconv's CUDA path (CuPy, compute capability >= 8.0) and torch's run here?

Every caller asks this module (verify, the torch ExmyLinear, the benchmarks, the format search), so
"is there a GPU" has one answer and one reason string. Importing it imports nothing heavy.
"""
from __future__ import annotations

import functools

from .launch import PDL_CAPABILITY


def _cupy():
    import cupy  # noqa: PLC0415 - optional dependency

    return cupy


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str:
    """Why the GPU path cannot run here ("" when it can)."""
    try:
        cupy = _cupy()
    except Exception as err:  # ImportError, or a CuPy build that cannot load its CUDA libraries
        return f"CuPy is not importable ({type(err).__name__}: {err})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA GPU found"
        major, minor = _capability()
    except Exception as err:
        return f"no usable CUDA GPU ({type(err).__name__}: {err})"
    if major < 8:
        return f"GPU compute capability {major}.{minor} is below 8.0 (bf16 tensor-core ops need sm_80+)"
    return ""


def available() -> bool:
    """True when CuPy imports and a CUDA GPU of compute capability >= 8.0 is present."""
    return unavailable_reason() == ""


def _capability() -> tuple[int, int]:
    cupy = _cupy()
    dev = cupy.cuda.Device()
    cc = dev.compute_capability  # e.g. "90"
    return int(cc[:-1]), int(cc[-1])


def device_info() -> dict:
    """Name, architecture and sizes of the current device (for reports)."""
    cupy = _cupy()
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    major, minor = _capability()
    return {"name": name, "arch": f"sm_{major}{minor}", "sms": int(props["multiProcessorCount"]),
            "l2_bytes": int(props["l2CacheSize"]), "memory_bytes": int(props["totalGlobalMem"]),
            "cuda_runtime": int(cupy.cuda.runtime.runtimeGetVersion()),
            "driver": int(cupy.cuda.runtime.driverGetVersion()), "cupy": cupy.__version__}



def pdl_available() -> bool:
    """Whether the current device has programmatic dependent launch (exmyconv.cuda.launch)."""
    return _capability() >= PDL_CAPABILITY


@functools.lru_cache(maxsize=8)
def sm_count(device_id: int) -> int:
    return int(_cupy().cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])



@functools.lru_cache(maxsize=1)
def torch_cuda_reason() -> str:
    """Why torch cannot use a CUDA GPU here ("" when it can)."""
    try:
        import torch

        return "" if torch.cuda.is_available() else "PyTorch sees no CUDA GPU"
    except Exception as err:
        return f"PyTorch with CUDA is not importable ({type(err).__name__}: {err})"


def bench_reason() -> str:
    """"" when both exmyconv's CUDA path and torch's can run (the benchmarks need both), else why not."""
    reason = unavailable_reason()
    if reason:
        return f"needs a CUDA GPU with CuPy: {reason}"
    reason = torch_cuda_reason()
    return f"needs PyTorch with CUDA ({reason})" if reason else ""
