"""Kernel launches with programmatic dependent launch (PDL, compute capability >= 9.0).

A kernel launched with the PDL attribute may start while the previous kernel in its stream is
still running, once every block of that kernel has executed ``griddepcontrol.launch_dependents``
(or exited). The kernel must execute ``griddepcontrol.wait`` before it reads anything the previous
kernel writes, and before it writes anything the previous kernel reads; that wait returns when
the previous kernel has finished and its writes are visible. kernels/gemv.cu issues its first
weight and scale loads before the wait (neither is written by the kernel before: the host waits
for the scales it derives, GpuWeight.kernel_scales), so a GEMV's memory ramp overlaps the tail of
the kernel before it. Every kernel executes ``griddepcontrol.launch_dependents`` only after its
own wait, so at most two kernels of a stream run at once: where kernels released their dependents
before waiting, three ran at once and CUDA-graph replays of bench --e2e's decoder differed from its
eager step (docs/kernels.md). Without the attribute the wait does nothing, so the kernels are
correct either way.

CuPy launches through cuLaunchKernel, which takes no launch attributes; this module calls the
driver's cuLaunchKernelEx through ctypes with the CUfunction CuPy compiled. Works inside CUDA
graph capture (the edge becomes a programmatic dependency).
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

from ..errors import ExmyError

_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID (cuda.h)
PDL_CAPABILITY = (9, 0)  # the lowest compute capability with programmatic dependent launch


class _AttrValue(ctypes.Union):  # CUlaunchAttributeValue: a 64-byte union
    _fields_ = [("pad", ctypes.c_char * 64), ("flag", ctypes.c_int), ("align", ctypes.c_void_p)]


class _Attr(ctypes.Structure):  # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)), ("num_attrs", ctypes.c_uint)]


@functools.lru_cache(maxsize=1)
def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuLaunchKernelEx
    fn.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_CTYPES = {np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.int64): ctypes.c_int64,
           np.dtype(np.uint32): ctypes.c_uint32, np.dtype(np.int32): ctypes.c_int32,
           np.dtype(np.float32): ctypes.c_float}


def _c_arg(a):
    """A kernel argument as a ctypes value: device arrays and ints by address, numpy scalars by value."""
    if type(a) is int:
        return ctypes.c_void_p(a)
    if hasattr(a, "data") and hasattr(a.data, "ptr"):  # cupy ndarray
        return ctypes.c_void_p(a.data.ptr)
    if isinstance(a, np.generic) and a.dtype in _CTYPES:
        return _CTYPES[a.dtype](a.item())
    raise TypeError(f"kernel argument of type {type(a).__name__}")


def torch_stream(device) -> int:
    """The handle of torch's current CUDA stream on ``device`` (a torch.device, or None: the current
    device), to launch on. ``torch._C._cuda_getCurrentRawStream``, which torch.compile's generated
    launchers call, takes 0.1 µs; ``torch.cuda.current_stream(device).cuda_stream`` builds a Stream
    object and took 5.1 µs on an H100 machine's host (2026-12-06), once per layer call of eager
    decoding. The public call where the private one is missing."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:
        return torch.cuda.current_stream(device).cuda_stream
    index = getattr(device, "index", None)
    return raw(torch.cuda.current_device() if index is None else index)


class Launch:
    """One kernel launch with fixed grid, block, shared memory and arguments, prepared once;
    call it with a stream handle (int) to launch, with the PDL attribute unless ``pdl=False``.
    :meth:`set_pointer` changes one pointer argument in place (the next call passes it)."""

    def __init__(self, raw_kernel, grid, block, args, shared_mem: int = 0, pdl: bool = True):
        self._fn = raw_kernel.kernel.ptr  # the CUfunction of a cupy RawKernel
        self._vals = [_c_arg(a) for a in args]
        self._params = (ctypes.c_void_p * len(self._vals))(*[ctypes.addressof(v) for v in self._vals])
        self._attr = _Attr(id=_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
        self._attr.value.flag = 1
        grid, block = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        self._config = _Config((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem, None,
                               ctypes.pointer(self._attr), 1 if pdl else 0)

    def set_pointer(self, index: int, address: int) -> None:
        self._vals[index].value = address

    def __call__(self, stream_handle: int):
        self._config.stream = stream_handle or None
        err = _driver()(ctypes.byref(self._config), self._fn, self._params, None)
        if err:
            raise ExmyError(f"cuLaunchKernelEx failed with CUDA error {err}")
