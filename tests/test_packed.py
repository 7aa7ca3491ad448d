"""exmyconv.torch.packed: the compute the vLLM plugin calls (CPU here; tests/test_gpu_vllm_compute.py on a GPU).

References: the torch codec's dequantization (itself tested bit for bit against formats/SPEC.md) and
F.linear; slice_k against slicing the dequantized weight.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from exmyconv.errors import ExmyError  # noqa: E402
from exmyconv.format.exmy import get_format  # noqa: E402
from exmyconv.format.pack import row_bytes  # noqa: E402
from exmyconv.format.quant import groups_of  # noqa: E402
from exmyconv.torch.codec import dequantize  # noqa: E402
from exmyconv.torch.packed import PackedLinear, packed_linear, slice_k  # noqa: E402
from fake_gpu import FakeGpu  # noqa: E402


def random_weight(rng, fmt: str, n: int, k: int, group: int | None, scale_dtype=torch.float16):
    """A packed weight of random codes (random payload bytes; padding bytes are never read) and scales."""
    f = get_format(fmt)
    packed = torch.from_numpy(rng.integers(0, 256, (n, row_bytes(f, k)), dtype=np.uint8))
    _, ngroups = groups_of(k, group)
    scale = torch.from_numpy(rng.uniform(0.005, 0.02, (n, ngroups)).astype(np.float32)).to(scale_dtype)
    return packed, scale


@pytest.mark.parametrize("fmt,k,group", [("e2m2", 256, None), ("e2m2s4", 320, 64), ("e3m2", 200, 32),
                                         ("e2m1", 96, None), ("e2m3s3", 384, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_equals_dequantize_then_linear(rng, fmt, k, group, dtype):
    n = 48
    packed, scale = random_weight(rng, fmt, n, k, group)
    spec = PackedLinear(fmt, k, n, group)
    bias = torch.randn(n).to(dtype)
    for rows in (1, 5, 40):
        x = torch.randn(2, rows, k).to(dtype)
        want = torch.nn.functional.linear(x, dequantize(packed, scale, fmt, k, group, dtype), bias)
        assert torch.equal(spec(x, packed, scale, bias), want)
        assert torch.equal(spec(x, packed, scale), torch.nn.functional.linear(
            x, dequantize(packed, scale, fmt, k, group, dtype)))


def test_float32_scales_give_the_same_weights(rng):
    """A fused layer whose shards stored fp16 and bf16 scales keeps them as float32 (exact for both)."""
    packed, scale = random_weight(rng, "e2m2", 32, 256, 64, torch.bfloat16)
    spec = PackedLinear("e2m2", 256, 32, 64)
    assert torch.equal(spec.dequantize(packed, scale.float(), torch.bfloat16),
                       spec.dequantize(packed, scale, torch.bfloat16))


def test_op_schema_and_fake():
    rng = np.random.default_rng(0)
    packed, scale = random_weight(rng, "e2m2", 24, 128, None)
    spec = PackedLinear("e2m2", 128, 24)
    x = torch.randn(3, 128)
    torch.library.opcheck(packed_linear, (x, packed, scale, None, spec.handle))
    torch.library.opcheck(packed_linear, (x, packed, scale, torch.randn(24), spec.handle))


def test_compiled_graph_keeps_one_op():
    """torch.compile(fullgraph=True) traces the op (its fake implementation) and runs the real one."""
    rng = np.random.default_rng(1)
    packed, scale = random_weight(rng, "e2m2s4", 40, 256, 64)
    spec = PackedLinear("e2m2s4", 256, 40, 64)

    def f(x):
        return torch.relu(torch.ops.exmyconv.packed_linear(x, packed, scale, None, spec.handle)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.randn(7, 256)
    assert torch.equal(compiled(x), f(x))


def test_a_dead_handle_is_one_clear_error():
    rng = np.random.default_rng(2)
    packed, scale = random_weight(rng, "e2m2", 8, 128, None)
    handle = PackedLinear("e2m2", 128, 8).handle  # the object is gone at once
    with pytest.raises(ExmyError, match="no longer exists"):
        torch.ops.exmyconv.packed_linear(torch.randn(1, 128), packed, scale, None, handle)


def test_check_names_the_expected_layout(rng):
    packed, scale = random_weight(rng, "e2m2", 8, 128, None)
    spec = PackedLinear("e2m3", 128, 8)
    with pytest.raises(ExmyError, match=r"uint8 \[8, 96\] for e2m3"):
        spec.check(packed, scale)


@pytest.mark.parametrize("fmt,k,group,parts", [("e2m2", 512, None, 2), ("e2m2s4", 512, 64, 4), ("e3m2", 384, 32, 3),
                                               ("e2m2", 1000, 100, 2), ("e2m3s3", 768, None, 2)])
def test_slice_k_equals_slicing_the_weight(rng, fmt, k, group, parts):
    """Row-parallel tensor parallelism: each rank's K range, repacked, decodes to that range of the weight."""
    n = 16
    packed, scale = random_weight(rng, fmt, n, k, group)
    full = dequantize(packed, scale, fmt, k, group, torch.float32)
    step = k // parts
    for r in range(parts):
        p, s, g = slice_k(packed, scale, fmt, k, group, r * step, step)
        assert p.shape == (n, row_bytes(get_format(fmt), step))
        assert torch.equal(dequantize(p, s, fmt, step, g, torch.float32), full[:, r * step:(r + 1) * step])
        p_only, none, _ = slice_k(packed, None, fmt, k, group, r * step, step)
        assert torch.equal(p_only, p) and none is None


@pytest.mark.parametrize("fmt,k,group,start,length,words", [
    ("e2m2", 512, 64, 32, 256, "cut scale groups of 64"),
    ("e2m2", 500, 64, 0, 250, "cut scale groups of 64"),
    ("e2m2s4", 510, None, 255, 255, "groups of 4 shared bits"),
    ("e2m2", 512, None, 256, 512, "not inside K=512"),
])
def test_slice_k_refuses_cuts_the_layout_cannot_hold(rng, fmt, k, group, start, length, words):
    packed, scale = random_weight(rng, fmt, 4, k, group)
    with pytest.raises(ExmyError, match=words):
        slice_k(packed, scale, fmt, k, group, start, length)


def test_vllm_plugin_entry_is_light_and_never_raises():
    """The entry point vLLM calls: importing it loads neither torch nor vLLM, and without a usable vLLM
    register() logs one line instead of raising (it must never break a vLLM process)."""
    import subprocess
    import sys

    code = ("import sys, exmyconv.integrations.vllm as v\n"
            "assert 'torch' not in sys.modules and 'vllm' not in sys.modules, sorted(sys.modules)\n"
            "sys.modules['vllm'] = None  # as if vLLM were missing or broken\n"
            "v.register(); v.register(); print('returned')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "returned", run.stderr
    lines = [line for line in run.stderr.splitlines() if "exmyconv" in line]
    assert len(lines) == 2 and "'exmy' quantization method is not available" in lines[0], run.stderr


def test_entry_point_is_declared():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert meta["entry-points"]["vllm.general_plugins"] == {"exmyconv": "exmyconv.integrations.vllm:register"}
    assert any(r.startswith("vllm") for r in meta["optional-dependencies"]["vllm"])


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    """torch's CUDA stream and device queries answered on the CPU, and an empty dequantization scratch,
    for PackedLinear's CUDA path with the stand-in backend (tests/fake_gpu.py)."""
    from types import SimpleNamespace

    from exmyconv.torch import packed as packed_mod

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(packed_mod, "_SCRATCH", {})


def test_cuda_path_with_a_fake_backend(rng, cpu_as_cuda):
    """The CUDA path of the vLLM layers (PackedLinear's per-weight state) on the CPU with a stand-in for
    exmyconv.cuda.gpu: N-d x keeps its shape; rows the kernel cannot read in place (a transposed view,
    an odd address) are copied first; more than MAX_BATCH rows are dequantized and go to F.linear; a
    wrong last dimension gets F.linear's error. Values equal the torch codec's + F.linear."""
    from exmyconv.torch import packed as packed_mod

    n, k = 24, 200
    packed, scale = random_weight(rng, "e2m2", n, k, 64, torch.bfloat16)
    spec = PackedLinear("e2m2", k, n, 64)
    gpu = FakeGpu()
    state = packed_mod._CudaState(gpu, spec, packed, scale, key=None)
    w = dequantize(packed, scale, "e2m2", k, 64, torch.bfloat16)
    bias = torch.randn(n, dtype=torch.bfloat16)
    base = torch.randn(2 * k + 1, dtype=torch.bfloat16)
    for x in (torch.randn(2, 8, k, dtype=torch.bfloat16), torch.randn(k, 3, dtype=torch.bfloat16).t(),
              base[1:k + 1], base[1:2 * k + 1].view(2, k)):
        y = state.forward(x, bias)
        assert y.shape == (*x.shape[:-1], n) and gpu.calls[-1] == f"gemv:{x.numel() // k}"
        assert torch.equal(y, torch.nn.functional.linear(x, w) + bias)
    x = torch.randn(17, k, dtype=torch.bfloat16)
    assert torch.equal(state.forward(x, bias), torch.nn.functional.linear(x, w, bias))
    assert gpu.calls[-1] == "dequantize:BF16"
    with pytest.raises(RuntimeError):
        state.forward(torch.randn(2, 100, dtype=torch.bfloat16), None)


def test_tile_order_with_a_fake_backend(rng, cpu_as_cuda):
    """PackedLinear.tile_ordered (what the vLLM layers take after loading): a new tensor of the same bytes
    in tile order where the backend takes the shape (whole 16-row tiles and 128-element blocks), after
    which calls read ``packed`` in tile order: the GEMV views it so (the stand-in decodes what it is told),
    the torch codec and the dequantized path decode it as the row-order weight; in_row_order (a reload)
    goes back. Shapes tile order does not take stay in row order."""
    from exmyconv.cuda import gpu as real_gpu
    from exmyconv.torch import packed as packed_mod

    n, k = 32, 256
    packed, scale = random_weight(rng, "e3m2", n, k, 64, torch.float16)
    spec, gpu = PackedLinear("e3m2", k, n, 64), FakeGpu()
    w = spec.dequantize(packed, scale, torch.float16)
    tiled = spec.tile_ordered(packed, gpu)
    assert spec.order == "tile" and torch.equal(tiled, real_gpu.tile_permuted(packed, spec.fmt, k, torch))
    assert not torch.equal(tiled, packed) and spec.tile_ordered(tiled, gpu) is None  # (once)
    assert torch.equal(spec.dequantize(tiled, scale, torch.float16), w)
    state = packed_mod._CudaState(gpu, spec, tiled, scale, key=None)
    for rows in (3, 17):  # the GEMV, then the dequantized weight and F.linear
        x = torch.randn(rows, k, dtype=torch.float16)
        assert torch.equal(state.forward(x, None), torch.nn.functional.linear(x, w))
    assert gpu.calls[0] == "upload:tile" and gpu.calls[-1] == "dequantize:F16"
    spec.in_row_order()
    assert spec.order == "row" and torch.equal(spec.dequantize(packed, scale, torch.float16), w)
    other = PackedLinear("e3m2", k, 24, 64)
    assert other.tile_ordered(packed[:24], gpu) is None and other.order == "row"


def test_a_launch_asking_for_a_workspace_gets_one_per_call():
    """torch.linear.call_gemv: a launch with work_bytes (gpu.GemvLaunch with x tiles) is given a fresh,
    16-byte aligned buffer of that size from torch's allocator at each call; one without gets none.
    gpu.x_tiles_bytes covers x's rows padded to 8 or 16 and K padded to 128 as fp16, then a float per
    padded row."""
    import torch

    from exmyconv.cuda import gpu
    from exmyconv.torch.linear import call_gemv

    calls = []

    class Launch:
        def __init__(self, work_bytes):
            self.work_bytes = work_bytes

        def __call__(self, x_ptr, y_ptr, stream, *work):
            calls.append((x_ptr, y_ptr, stream, *work))

    call_gemv(Launch(0), 16, 32, torch.device("cpu"), 7)
    assert calls.pop() == (16, 32, 7)
    for _ in range(2):
        call_gemv(Launch(4144), 16, 32, torch.device("cpu"), 7)
        x_ptr, y_ptr, stream, work = calls.pop()
        assert (x_ptr, y_ptr, stream) == (16, 32, 7) and work and work % 16 == 0
    for batch in (1, 2, 3, 7, 16):
        for k in (1, 7, 8, 100, 4096, 14336):
            size, rows, kp = gpu.x_tiles_bytes(batch, k), 8 if batch <= 8 else 16, -(-k // 128) * 128
            assert size % 16 == 0 and size == rows * kp * 2 + 4 * rows, (batch, k)
