"""`exmyconv verify`: re-read a written checkpoint and prove it decodes as specified.

CPU check: every file and tensor passes the integrity checks, every quantized tensor decodes
without NaN/Inf, and (given the source) its error against the source weights matches the stored
one. GPU check (when CuPy and a GPU are present): the CUDA dequantizer reproduces the CPU
reference bit for bit, in fp16 and bf16.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..format import dtypes
from ..io.checkpoint import Checkpoint
from ..errors import ExmyError
from ..format.quant import relative_error, wide_scale_dtype
from ..io.source import open_source


@dataclass
class VerifyReport:
    tensors: int = 0
    gpu: str = ""  # what happened to the GPU check
    gpu_exact: int = 0
    gpu_unsupported: int = 0  # tensors in formats the kernels do not decode yet (shared formats)
    errors: dict[str, float] = field(default_factory=dict)  # recomputed vs source
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def gpu_backend():
    """(the GPU module, "") or (None, the reason there is none)."""
    from .. import cuda
    from ..cuda import device

    gpu = cuda.backend()
    return gpu, "" if gpu is not None else (device.unavailable_reason() or "the CUDA module does not load")


def _bits(values: np.ndarray, dtype: str) -> np.ndarray:
    return dtypes.store(values, dtype).view(np.uint16)


def verify(out_dir: str, source_dir: str | None = None, use_gpu: bool | None = None) -> VerifyReport:
    report = VerifyReport()
    gpu, why = gpu_backend() if use_gpu is not False else (None, "not asked for")
    if use_gpu and gpu is None:
        raise ExmyError(f"GPU check asked for, but {why}")
    report.gpu = "bit-exact check on the GPU" if gpu else f"skipped: {why}"
    source = open_source(source_dir) if source_dir else None
    try:
        src_tensors = {info.name: (info, f) for info, f in source.tensors} if source else {}
        with Checkpoint(out_dir) as ckpt:
            if not ckpt.is_exmy:
                raise ExmyError(f"{ckpt.path}: not an exmy checkpoint (no exmy records in its files, no "
                                "quantization_config with quant_method \"exmy\" in config.json): nothing to verify")
            report.problems += ckpt.problems
            for name, (record, f) in sorted(ckpt.records.items()):
                report.tensors += 1
                if name in ckpt.bad_scales:
                    continue
                exact = ckpt.dequantize(name, "F32")
                if not np.isfinite(exact).all():
                    report.problems.append(f"{name}: decodes to NaN/Inf")
                if gpu is not None and not gpu.supports_dequant(record.fmt):
                    report.gpu_unsupported += 1
                elif gpu is not None:
                    report.gpu_exact += _gpu_matches(gpu, ckpt, name, exact, report)
                if name in src_tensors:
                    info, sf = src_tensors[name]
                    x = dtypes.to_float32(sf.read(name), info.dtype).reshape(exact.shape)
                    diff = (exact - x).ravel()
                    err = relative_error(float(np.dot(diff, diff)), float(np.dot(x.ravel(), x.ravel())))
                    report.errors[name] = err
                    if abs(err - record.rel_error) > 1e-3 * max(err, 1e-6) + 1e-7:
                        report.problems.append(f"{name}: error vs source {err:.6e}, stored {record.rel_error:.6e}")
                elif source is not None:
                    report.problems.append(f"{name}: not in the source checkpoint")
    finally:
        if source:
            source.close()
    return report


def _gpu_matches(gpu, ckpt: Checkpoint, name: str, exact: np.ndarray, report: VerifyReport) -> bool:
    record, f = ckpt.records[name]
    scales, scale_dtype = ckpt.scales(name)
    if scale_dtype == "F8_E4M3":  # the GPU decoder takes 16-bit scales: 8-bit ones widen exactly
        scale_dtype = wide_scale_dtype(scales, record.fmt)
    payload = np.ascontiguousarray(ckpt.payload(name))
    ok = True
    for out_dtype in ("F16", "BF16"):
        got = gpu.dequantize(payload, scales, scale_dtype, record.fmt, record.k, record.group_size, out_dtype)
        got_bits = np.asarray(got.get()).view(np.uint16).reshape(exact.shape)
        want = _bits(dtypes.round_to(exact, out_dtype), out_dtype)
        mismatches = int((got_bits != want).sum())
        if mismatches:
            ok = False
            report.problems.append(f"{name}: GPU {out_dtype} dequantization differs from the CPU "
                                   f"reference in {mismatches} of {want.size} elements")
    return ok


def render(report: VerifyReport) -> str:
    lines = [f"verified {report.tensors} quantized tensor{'' if report.tensors == 1 else 's'}"]
    if report.gpu.startswith("skipped"):
        lines.append(f"  GPU check {report.gpu}; ran the CPU check only")
    else:
        lines.append(f"  GPU check: {report.gpu_exact}/{report.tensors - report.gpu_unsupported} tensors "
                     "bit-exact in fp16 and bf16"
                     + (f"; {report.gpu_unsupported} in shared formats (no GPU kernel yet) checked on the CPU only"
                        if report.gpu_unsupported else ""))
    lines.append("  CPU check: integrity, decoding (no NaN/Inf)")
    if report.errors:
        worst = max(report.errors.items(), key=lambda kv: kv[1])
        lines.append(f"  error vs source: mean {np.mean(list(report.errors.values())):.4f}, "
                     f"worst {worst[1]:.4f} ({worst[0]})")
    lines.append("  OK" if report.ok else f"  {len(report.problems)} problem(s):")
    lines += [f"    - {p}" for p in report.problems]
    return "\n".join(lines)
