"""ExmyLinear on CUDA: the fused kernels through torch, eagerly, under torch.compile and in CUDA graphs.

Skipped with a reason without CuPy, a CUDA GPU or CUDA torch (CI); EXMY_REQUIRE_GPU=1 (scripts/gpu-check)
turns that skip into a failure.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from exmyconv.cuda import device

_REASON = device.bench_reason()
if _REASON and os.environ.get("EXMY_REQUIRE_GPU"):
    raise RuntimeError(f"EXMY_REQUIRE_GPU is set but the GPU path is unavailable: {_REASON}")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_REASON), reason=_REASON or "GPU present")]


def _layer(rng, fmt="e2m2", k=4096, n=1024, group=None, bias=True, dtype=None):
    import torch

    from exmyconv.format.exmy import get_format
    from exmyconv.format.quant import quantize
    from exmyconv.torch.linear import ExmyLinear

    q = quantize((rng.standard_normal((n, k)) * 0.02).astype(np.float32), get_format(fmt), group)
    layer = ExmyLinear(k, n, fmt, group, bias=bias, scale_dtype=torch.float16 if q.scale_dtype == "F16" else torch.bfloat16)
    layer.weight_packed.copy_(torch.from_numpy(q.payload))
    layer.weight_scale.copy_(torch.from_numpy(q.scales))
    if bias:
        layer.bias.data = torch.randn(n) * 0.1
    layer.requires_grad_(False)
    return layer.to(device="cuda", dtype=dtype or torch.float16)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_eager_cuda_forward_matches_the_dequantized_weight(rng, dtype_name, rows):
    import torch

    dtype = getattr(torch, dtype_name)
    layer = _layer(rng, dtype=dtype)
    x = torch.randn(rows, layer.in_features, device="cuda", dtype=dtype)
    y = layer(x)
    want = torch.nn.functional.linear(x.float(), layer.dequantize_weight(torch.float32), layer.bias.float())
    assert y.dtype == dtype and y.shape == (rows, layer.out_features) and not torch.isnan(y).any()
    if rows > 16:  # bit-exact dequantization + the same F.linear as the plain model
        plain = torch.nn.functional.linear(x, layer.dequantize_weight(dtype), layer.bias)
        assert torch.equal(y, plain)
    err = ((y.float() - want).norm() / want.norm()).item()
    assert err < (4e-3 if dtype == torch.float16 else 2e-2), err


@pytest.mark.parametrize("fmt", ["e2m2", "e3m2", "e4m3", "e2m1"])
def test_the_layer_in_tile_order_equals_row_order(rng, fmt):
    """On CUDA the layer holds its buffer in tile order (ExmyLinear.align_rows, linear.tile_ordered): its
    outputs equal bit for bit those of the same layer kept in row order, at GEMV batches and past them,
    fp16 and bf16 x; state_dict, dequantize_weight and .cpu() give the file's bytes back."""
    import copy

    import torch

    from exmyconv.format.exmy import get_format
    from exmyconv.format.quant import quantize
    from exmyconv.torch.linear import ExmyLinear

    k, n = 4096, 1024
    q = quantize((rng.standard_normal((n, k)) * 0.02).astype(np.float32), get_format(fmt), 128)
    layer = ExmyLinear(k, n, fmt, 128, bias=False, scale_dtype=torch.float16)
    layer.weight_packed.copy_(torch.from_numpy(q.payload))
    layer.weight_scale.copy_(torch.from_numpy(q.scales))
    row = copy.deepcopy(layer)
    row._may_tile = False
    layer, row = layer.cuda(), row.cuda()
    assert layer._tiled is layer.weight_packed and row._tiled is None
    assert not torch.equal(layer.weight_packed.cpu(), row.weight_packed.cpu())
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16):
            for rows in (1, 2, 5, 8, 9, 16, 40):
                x = torch.randn(rows, k, device="cuda", dtype=dtype)
                y = layer(x)
                assert not torch.isnan(y).any() and torch.equal(y, row(x)), (dtype, rows)
    assert layer._gpu_weight_cache[1].order == "tile" and row._gpu_weight_cache[1].order == "row"
    assert np.array_equal(layer.state_dict()["weight_packed"].cpu().numpy(), q.payload)
    assert torch.equal(layer.dequantize_weight(torch.float32), row.dequantize_weight(torch.float32))
    layer.cpu()
    assert layer._tiled is None and np.array_equal(layer.weight_packed.numpy(), q.payload)


def test_eager_cuda_input_gradient(rng):
    """Adapters trained on a packed model: with x requiring its gradient, the eager CUDA forward at a
    fused-GEMV batch (4 rows) gives x and the bias the gradients of F.linear with the dequantized
    weight (the layer takes the op, whose backward multiplies by that weight)."""
    import torch

    layer = _layer(rng)
    layer.bias.requires_grad_(True)
    x = torch.randn(4, layer.in_features, device="cuda", dtype=torch.float16, requires_grad=True)
    y = layer(x)
    assert y.grad_fn is not None and not torch.isnan(y).any()
    y.float().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, layer.dequantize_weight(torch.float16), b2).float().sum().backward()
    assert torch.allclose(x.grad.float(), x2.grad.float(), rtol=1e-3, atol=1e-3)
    assert torch.equal(layer.bias.grad, b2.grad)


def test_compiled_reduce_overhead_equals_eager(rng):
    """torch.compile(mode="reduce-overhead", fullgraph=True): the custom op in CUDA graphs, replayed
    with fresh inputs, gives exactly the eager results (same kernels, same inputs)."""
    import torch

    torch._dynamo.reset()
    model = torch.nn.Sequential(_layer(rng, "e2m2", 1024, 2048), torch.nn.SiLU(),
                                _layer(rng, "e2m1", 2048, 1024, group=128)).eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for step in range(6):  # warm-up runs, recording, then replays
            x = torch.randn(3, 1024, device="cuda", dtype=torch.float16)
            got = compiled(x).clone()
            assert torch.equal(got, model(x)), step


def test_cuda_graph_capture_of_the_layer(rng):
    """A manual CUDA-graph capture of the forward (no allocation or host sync inside after warm-up)."""
    import torch

    layer = _layer(rng, "e2m2s4", 4096, 4096)
    static_x = torch.randn(2, 4096, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        layer(static_x)  # warm-up: kernel compiled, scales prepared
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            assert torch.equal(static_y, layer(static_x))


def test_cupy_view_of_torchs_stream():
    """gpu.cupy_stream: CuPy's view of a torch stream is that stream (same handle; a CuPy kernel queued on
    it runs after the torch work queued before it), made without a deprecation warning (CuPy 14
    deprecates ExternalStream; Stream.from_external takes the CUDA stream protocol)."""
    import warnings

    import cupy
    import torch

    from exmyconv.cuda import gpu

    side = torch.cuda.Stream()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        view = gpu.cupy_stream(side.cuda_stream)
    assert view.ptr == side.cuda_stream
    a = torch.zeros(1 << 24, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # ~10 ms on the GPU before the fill
        a.fill_(1.0)
    with view:
        b = cupy.asarray(a) + 1  # queued on the same stream: sees the fill
    view.synchronize()
    assert float(b.min()) == 2.0


def test_torch_stream_is_torchs_current_stream():
    """cuda.launch.torch_stream (the raw handle every layer call launches on) is torch's current stream:
    the default one, a side stream under ``torch.cuda.stream``, the capturing stream of a CUDA graph,
    for a device given with and without its index."""
    import torch

    from exmyconv.cuda.launch import torch_stream

    dev = torch.device("cuda", torch.cuda.current_device())
    for device in (dev, torch.device("cuda"), None):
        assert torch_stream(device) == torch.cuda.current_stream(dev).cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert torch_stream(dev) == side.cuda_stream != torch.cuda.default_stream(dev).cuda_stream
    graph, seen = torch.cuda.CUDAGraph(), []
    x = torch.zeros(8, device="cuda")
    with torch.cuda.graph(graph):
        seen.append((torch_stream(dev), torch.cuda.current_stream(dev).cuda_stream))
        x += 1
    assert seen[0][0] == seen[0][1]


def test_more_rows_run_on_torchs_stream_and_in_a_graph(rng):
    """More than 16 rows (dequantize + F.linear): the dequantization runs on torch's current stream, so
    a forward on a side stream and a CUDA-graph capture (which refuses launches on other streams)
    give the eager default-stream result bit for bit."""
    import torch

    layer = _layer(rng, "e2m2", 1024, 2048)
    with torch.no_grad():
        x = torch.randn(40, 1024, device="cuda", dtype=torch.float16)
        want = layer(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            got = layer(x)
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(got, want)
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for _ in range(2):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            assert torch.equal(static_y, layer(static_x))


@pytest.mark.parametrize("fmt,group", [("e2m2", None), ("e2m2s4", None), ("e3m2", 128)])
def test_prepared_launch_follows_new_inputs(rng, fmt, group):
    """The layer prepares its GEMV launch once per (rows, dtype); later calls with other x buffers
    (fresh values, other addresses, an unaligned view) give exactly what a freshly planned GEMV gives,
    and write every output element (the freed memory the output reuses is NaN-filled first)."""
    import torch

    from exmyconv.cuda import gpu

    layer = _layer(rng, fmt, 2048, 3072, group=group, bias=False)
    weight = layer._gpu_weight(gpu)
    with torch.no_grad():
        for rows in (1, 3, 16, 1, 3):
            base = torch.randn(rows * 2048 + 8, device="cuda", dtype=torch.float16)
            for x in (base[:rows * 2048].view(rows, 2048), base[1:rows * 2048 + 1].view(rows, 2048)):  # aligned, 2 B off
                want = gpu.gemv(x.contiguous().clone(), weight)
                nan = torch.full((rows, 3072), float("nan"), device="cuda", dtype=torch.float16)
                del nan  # the caching allocator hands this block to the layer's output next
                got = layer(x)
                assert not torch.isnan(got).any()
                assert torch.equal(got, want), (rows, x.data_ptr() % 16)
        assert set(layer._launches) == {(1, torch.float16), (3, torch.float16), (16, torch.float16)}


@pytest.mark.parametrize("fmt,k", [("e2m2", 576), ("e2m2s4", 2816), ("e2m3s3", 544), ("e3m2s4", 544)])
def test_rows_not_16_byte_multiples_are_read_in_place(rng, fmt, k):
    """Layout 2.0 rows may be 4-byte multiples only (K = 576 e2m2: 360 bytes). On the GPU the layer lays
    its buffer out with 16-byte aligned rows once (a [N, row_bytes] view of wider storage), the kernels
    read it in place (no second copy of the weight), and the results match the dequantized weight."""
    import torch

    from exmyconv.cuda import gpu
    from exmyconv.format.exmy import get_format
    from exmyconv.format.pack import row_bytes

    rb = row_bytes(get_format(fmt), k)
    assert rb % 16, "the case must need the wider row layout"
    layer = _layer(rng, fmt=fmt, k=k, n=300)
    packed = layer.weight_packed
    assert packed.shape == (300, rb) and packed.stride(0) == gpu.kernel_stride(rb) and packed.data_ptr() % 16 == 0
    weight = layer._gpu_weight(gpu)
    assert weight.payload.data.ptr == packed.data_ptr() and weight.payload.strides[0] == packed.stride(0)
    want_w = layer.dequantize_weight(torch.float16)  # the torch codec (CPU-equal, tests/test_torch_codec.py)
    for rows in (1, 4, 9, 16):
        x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
        y = layer(x)
        want = torch.nn.functional.linear(x.float(), layer.dequantize_weight(torch.float32), layer.bias.float())
        assert not torch.isnan(y).any()
        err = ((y.float() - want).norm() / want.norm()).item()
        assert err < 4e-3, (rows, err)
    # the bit-exact dequantization kernel reads the same rows
    out = torch.empty((300, k), dtype=torch.float16, device="cuda")
    weight.dequantize("F16", out=out)
    assert torch.equal(out, want_w)


@pytest.mark.parametrize("fmt,k,group", [("e2m1", 576, 32), ("e2m2s4", 4096, 64), ("e3m2", 1000, 100)])
def test_8_bit_scales_on_cuda(rng, fmt, k, group):
    """An ExmyLinear holding 8-bit scales (float8_e4m3fn times 2^scale_exp) on CUDA: the GEMV (rows
    <= 16) against the dequantized weight, and the dequantize + F.linear path (more rows) equal, bit for
    bit, to the plain layer with that weight."""
    import torch

    from exmyconv.format import dtypes
    from exmyconv.format.exmy import get_format
    from exmyconv.format.quant import quantize
    from exmyconv.torch.linear import ExmyLinear

    n = 300
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    if fmt == "e3m2":
        w[7] *= 1e-4  # groups whose widened scales leave the fp16 range: bf16 for the kernels
    q = quantize(w, get_format(fmt), group, scales8=True)
    layer = ExmyLinear(k, n, fmt, group, bias=True, scale_dtype=torch.float8_e4m3fn, scale_exp=q.scale_exp)
    layer.weight_packed.copy_(torch.from_numpy(q.payload))
    stored = dtypes.store(q.scales * np.float32(2.0 ** -q.scale_exp), "F8_E4M3")
    layer.weight_scale.copy_(torch.from_numpy(stored).view(torch.float8_e4m3fn))
    layer.bias.data = torch.randn(n) * 0.1
    layer.requires_grad_(False)
    layer = layer.to(device="cuda", dtype=torch.float16)
    assert layer.weight_scale.dtype == torch.float8_e4m3fn
    from exmyconv.cuda import gpu
    assert layer._gpu_weight(gpu).scale_dtype == ("BF16" if fmt == "e3m2" else "F16")
    want_w = torch.from_numpy(q.dequantize()).cuda()
    assert torch.equal(layer.dequantize_weight(torch.float32), want_w)
    for rows in (1, 4, 12, 40):
        for dtype in (torch.float16, torch.bfloat16):
            layer = layer.to(dtype=dtype)
            x = torch.randn(rows, k, device="cuda", dtype=dtype)
            y = layer(x)
            assert y.dtype == dtype and not torch.isnan(y).any()
            if rows > 16:
                assert torch.equal(y, torch.nn.functional.linear(x, want_w.to(dtype), layer.bias))
            else:
                ref = torch.nn.functional.linear(x.float(), want_w, layer.bias.float())
                err = ((y.float() - ref).norm() / ref.norm()).item()
                assert err < (4e-3 if dtype == torch.float16 else 2e-2), (rows, dtype, err)


@pytest.mark.parametrize("scales8", [False, True])
def test_packed_embedding_on_cuda(rng, scales8):
    """ExmyEmbedding on CUDA: lookups equal the rows of the dequantized table bit for bit, eagerly and in a
    CUDA graph replayed with fresh ids (the lookup never synchronises with the host)."""
    import torch

    from exmyconv.format.exmy import get_format
    from exmyconv.format.quant import quantize
    from exmyconv.torch.embedding import ExmyEmbedding

    q = quantize((rng.standard_normal((1000, 512)) * 0.05).astype(np.float32), get_format("e2m2"), 64, scales8=scales8)
    scale_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn}[q.scale_dtype]
    emb = ExmyEmbedding(1000, 512, "e2m2", 64, scale_dtype=scale_dtype, scale_exp=q.scale_exp if scales8 else None)
    emb.weight_packed.copy_(torch.from_numpy(q.payload))
    emb.weight_scale.copy_(torch.from_numpy(q.scales * np.float32(2.0 ** -q.scale_exp)).to(scale_dtype))
    emb = emb.to(device="cuda", dtype=torch.bfloat16)
    table = torch.from_numpy(q.dequantize("BF16")).to(torch.bfloat16).cuda()
    ids = torch.from_numpy(rng.integers(0, 1000, (4, 9))).cuda()
    assert torch.equal(emb(ids), table[ids])
    static = ids.clone()
    out = emb(static)  # (warm-up outside the capture)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = emb(static)
    for _ in range(3):
        static.copy_(torch.from_numpy(rng.integers(0, 1000, (4, 9))).cuda())
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, table[static])


@pytest.mark.parametrize("rows", [1, 4, 16, 40])
def test_sibling_group_on_cuda(rng, rows):
    """q/k/v of Llama-3-8B's attention as one layer of all their rows (exmyconv.torch.siblings): each
    member gets its own rows' product within the GEMV's error bound (exactly the plain F.linear of the
    dequantized rows at 40 rows), one launch serves all three, and a compiled CUDA graph
    (reduce-overhead, fullgraph) replays exactly the eager results."""
    import torch

    from exmyconv.torch.siblings import SiblingGroup

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (_layer(rng, n=n, bias=n == 1024, dtype=torch.bfloat16)
                                                     for n in (4096, 1024, 1024))

        def forward(self, x):
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    att = Attention().eval()
    members = (att.q_proj, att.k_proj, att.v_proj)
    wants = [m.dequantize_weight(torch.float32) for m in members]
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    group = SiblingGroup(list(members))
    with torch.no_grad():
        got = att(x)
        launches = group.fused._launches.copy()
        for y, m, w in zip(got, members, wants):
            want = torch.nn.functional.linear(x.float(), w, None if m.bias is None else m.bias.float())
            assert y.shape == (rows, m.out_features) and not torch.isnan(y).any()
            err = ((y.float() - want).norm() / want.norm()).item()
            assert err < 2e-2, err
            if rows > 16:
                lo, hi = group.bounds[members.index(m)]
                plain = torch.nn.functional.linear(x, group.fused.dequantize_weight(torch.bfloat16))[:, lo:hi]
                assert torch.equal(y, plain if m.bias is None else plain + m.bias)
        assert all(m._launches == {} for m in members) and len(launches) == (rows <= 16)
        torch._dynamo.reset()
        compiled = torch.compile(att, mode="reduce-overhead", fullgraph=True)
        for step in range(5):
            x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
            got = [y.clone() for y in compiled(x)]
            assert all(torch.equal(g, e) for g, e in zip(got, att(x))), step
    assert group.pending is None and all(m._siblings for m in members)
