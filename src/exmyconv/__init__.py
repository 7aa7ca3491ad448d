"""exmyconv: low-bit ExMy floating-point weights for LLM checkpoints.

Python API (mirrors the CLI):

    import exmyconv
    summary = exmyconv.quantize("path/to/model", "out/model-e2m2", format="e2m2")
    report = exmyconv.inspect("out/model-e2m2")           # the dict `exmyconv inspect --json` prints
    state_dict = exmyconv.load_state_dict("out/model-e2m2")  # dequantized torch tensors
    exmyconv.dequantize("out/model-e2m2", "out/model-fp16", dtype="float16")  # plain checkpoint again
"""
from __future__ import annotations

from ._version import __version__
from .errors import ExmyError
from .format.exmy import ExMy, get_format

try:  # registers quant_method "exmy" with transformers, lazily (integrations/transformers.py)
    from .integrations import transformers as _hf  # noqa: F401
except ImportError:
    pass


def quantize(model_dir: str, out_dir: str, format: str = "e2m2", group_size: int | None = None,
             skip: tuple[str, ...] = (), quantize_embeddings: bool = False, quantize_routers: bool = False,
             max_shard_size: int = 5 * 10**9, clip_search: bool = False, bits: float | None = None, max_error: float | None = None,
             candidates: str | None = None, tie_fused: bool = True, calibration: str | None = None,
             calibration_tokens: int = 4096, rounding: str = "nearest", scales: str = "16", overwrite: bool = False,
             progress: bool | None = False,
             resume: bool = False, ray: str | bool | None = None, workers: int | None = None,
             dry_run: bool = False):
    """Convert a safetensors checkpoint directory (``format="auto"`` with ``bits`` or ``max_error``
    searches a format per tensor, tying the tensors engines fuse unless ``tie_fused=False``;
    ``resume`` continues an interrupted run; ``ray=True`` or an address runs the work on a Ray
    cluster with ``workers`` tasks at once; ``rounding="gptq"`` with ``calibration``: error-compensating
    rounding; ``scales="e4m3"``: 8-bit scales); returns a pipeline.Summary. ``dry_run=True``: the plan
    only (``summary.plan``), nothing written, as ``exmyconv quantize --dry-run``."""
    from .convert.pipeline import Options, convert, dry_run as plan_only

    runner = None
    if ray:
        from .convert.ray_runner import RayRunner

        runner = RayRunner(None if ray is True else ray, workers)

    opts = Options(format=format, group_size=group_size, skip=tuple(skip), quantize_embeddings=quantize_embeddings,
                   quantize_routers=quantize_routers, max_shard_size=max_shard_size, clip_search=clip_search, bits=bits, max_error=max_error,
                   candidates=candidates, tie_fused=tie_fused, calibration=calibration,
                   calibration_tokens=calibration_tokens, rounding=rounding, scales=scales)
    if dry_run:
        if resume or ray:
            raise ExmyError("dry_run only plans, in this process: leave out resume and ray")
        return plan_only(model_dir, out_dir, opts, overwrite=overwrite, progress=progress)
    return convert(model_dir, out_dir, opts, overwrite=overwrite, progress=progress, resume=resume, runner=runner)


def dequantize(out_dir: str, fp_dir: str, dtype: str | None = None, overwrite: bool = False) -> dict:
    """An exmy checkpoint back to a plain float16/bfloat16/float32 safetensors folder."""
    from .convert.dequantize import dequantize_checkpoint

    return dequantize_checkpoint(out_dir, fp_dir, dtype, overwrite=overwrite, progress=False)


def inspect(path: str) -> dict:
    """What `exmyconv inspect --json PATH` reports."""
    from .check.inspection import inspect_checkpoint

    return inspect_checkpoint(path)


def load_state_dict(path: str, dtype=None) -> dict:
    """A converted checkpoint as a torch state dict, quantized tensors dequantized."""
    from .torch.state_dict import load_state_dict as _load

    return _load(path, dtype)


__all__ = ["ExMy", "ExmyError", "dequantize", "get_format", "inspect", "load_state_dict", "quantize", "__version__"]
