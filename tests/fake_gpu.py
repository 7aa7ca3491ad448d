"""A stand-in for exmyconv.cuda.gpu on the CPU, for the CUDA paths of the packed layers (ExmyLinear,
PackedLinear): the same call signatures, computing with the torch codec. Its prepared GEMV reads x
and writes y at the addresses it is given, as the kernel does, so a layer that hands it the wrong
memory gets wrong values. ``calls`` records what ran: "upload:row|tile", "gemv:ROWS", "dequantize:F16|BF16"."""
from __future__ import annotations

import ctypes

import torch

from exmyconv.cuda import gpu
from exmyconv.torch.codec import dequantize

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16}


def tensor_at(address: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The [rows, cols] 16-bit tensor at a CPU address."""
    raw = (ctypes.c_uint8 * (2 * rows * cols)).from_address(address)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(rows, cols)


class FakeGpu:
    MAX_BATCH = 16

    def __init__(self, upload_check=None):
        self.calls = []
        self.upload_check = upload_check  # called with upload's keyword arguments (a test's assertions)

    def supports(self, fmt):
        return fmt.share == 1

    tile_order_applies = staticmethod(gpu.tile_order_applies)  # the layers reorder their buffers by the real rule

    def gemv_applies(self, fmt, x_dtype, rows):  # the rule of exmyconv.cuda.gpu.gemv_applies
        return 1 <= rows <= self.MAX_BATCH and x_dtype in DTYPES and self.supports(fmt)

    def upload(self, *, payload, scales, scale_dtype, fmt, shape, group_size, order=None, payload_order="row"):
        assert order == payload_order, "the torch layers view their own buffers in the order they hold them"
        if self.upload_check is not None:
            self.upload_check(scale_dtype=scale_dtype, shape=tuple(shape), group_size=group_size)
        self.calls.append(f"upload:{order}")
        if order == "tile":  # (the kernels read tile order; the stand-in decodes the bytes put back in row order)
            payload = gpu.row_permuted(payload, fmt, shape[-1], torch)
        fake = self

        class Weight:
            n, k = shape[0], shape[-1]

            def values(self, out_dtype):  # (unrecorded)
                return dequantize(payload, scales, fmt, shape[-1], group_size, DTYPES[out_dtype])

            def dequantize(self, out_dtype="F16", out=None):
                fake.calls.append(f"dequantize:{out_dtype}")
                w = self.values(out_dtype)
                return w if out is None else out.copy_(w)

            def dequant_plan(self, out, out_dtype):
                return lambda: self.dequantize(out_dtype, out=out)

        return Weight()

    def GemvLaunch(self, weight, x_dtype, rows, overlap=False):  # noqa: N802 (gpu.GemvLaunch's signature)
        """Prepared once; called with the addresses of x [rows, K] and y [rows, N]."""
        dtype = DTYPES[x_dtype]
        fake = self

        def launch(x_ptr, y_ptr, stream):
            assert x_ptr % 16 == 0
            fake.calls.append(f"gemv:{rows}")
            x = tensor_at(x_ptr, rows, weight.k, dtype)
            tensor_at(y_ptr, rows, weight.n, dtype).copy_(torch.nn.functional.linear(x, weight.values(x_dtype)))

        launch.work_bytes = 0  # (no workspace: gpu.GemvLaunch's x tiles are not faked)
        return launch
