"""The vLLM plugin's compute on a GPU, without vLLM: torch.ops.exmyconv.packed_linear (PackedLinear), the
function ExmyLinearMethod.apply calls, on the packed tensors of a real conversion.

- against the dequantized reference (``exmyconv.io.checkpoint.open_checkpoint`` / ``exmyconv dequantize``
  values): above 16 rows bitwise equal to F.linear with the dequantized weight (bit-exact GPU
  dequantization, the same cuBLAS call); up to 16 rows (the fused GEMV) within the GEMV's rounding;
  float32 activations (dequantized to float32 on the GPU) and float32 scales (the torch codec) bitwise;
- prepared, then captured in a CUDA graph (several layers, GEMV and dequantize + cuBLAS paths, sharing the
  dequantization scratch) and replayed with new inputs: equal to eager calls, bit for bit.

Skipped with a reason without CuPy, a CUDA GPU or CUDA torch (CI); EXMY_REQUIRE_GPU=1 turns that skip
into a failure. Imports no vLLM (its CUDA build is not on the GPU machine).
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

SHAPES = {"model.layers.0.self_attn.qkv.weight": (1536, 1024), "model.layers.0.mlp.down_proj.weight": (1024, 2816)}
VARIANTS = {"e2m2": {"format": "e2m2"}, "e2m2s4-g64": {"format": "e2m2s4", "group_size": 64},
            "e3m2-g128": {"format": "e3m2", "group_size": 128}, "e2m1-g32": {"format": "e2m1", "group_size": 32}}


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """{variant: {tensor: (TensorRecord, packed, scale, reference float32 weight)}} from exmyconv.quantize."""
    import safetensors.numpy

    import exmyconv
    from exmyconv.io.checkpoint import open_checkpoint

    root = tmp_path_factory.mktemp("gpu-vllm")
    rng = np.random.default_rng(7)
    src = root / "src"
    src.mkdir()
    tensors = {n: (rng.standard_normal(s) * 0.02).astype(np.float16) for n, s in SHAPES.items()}
    safetensors.numpy.save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = {}
    for variant, options in VARIANTS.items():
        dest = root / variant
        exmyconv.quantize(str(src), str(dest), **options)
        with open_checkpoint(str(dest)) as ckpt:  # the reader the plugin uses (validated)
            out[variant] = {}
            for name, (record, f) in ckpt.records.items():
                out[variant][name] = (record, f.read(record.packed_name).copy(), f.read(record.scale_name).copy(),
                                      f.tensors[record.scale_name].dtype, ckpt.dequantize(name, "F32"))
    return out


def _layer(entry):
    """(PackedLinear, packed, scale, reference weight) on the GPU from a conversion's tensor."""
    import torch

    from exmyconv.torch.packed import PackedLinear

    record, packed, scale, scale_dtype, ref = entry
    scale_t = torch.from_numpy(scale.view(np.int16)).view(torch.float16 if scale_dtype == "F16" else torch.bfloat16)
    spec = PackedLinear(record.fmt, record.k, record.shape[0], record.group_size)
    return spec, torch.from_numpy(packed).cuda(), scale_t.cuda(), torch.from_numpy(ref).cuda()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("order", ["row", "tile"])
def test_outputs_against_the_dequantized_reference(conversions, variant, dtype_name, order):
    """order "tile": the packed tensor replaced by PackedLinear.tile_ordered's, as the vLLM layers do after
    loading (unshared formats; e2m2s4 stays in row order), and every output equal bit for bit to the
    same layer's in row order."""
    import torch

    dtype = getattr(torch, dtype_name)
    for name, entry in conversions[variant].items():
        spec, packed, scale, ref = _layer(entry)
        row_spec, row_packed = spec, packed
        if order == "tile":
            row_spec = _layer(entry)[0]
            tiled = spec.tile_ordered(packed)
            assert (tiled is None) == (spec.fmt.share > 1) and spec.order == ("row" if tiled is None else "tile")
            packed = packed if tiled is None else tiled
        w = ref.to(dtype)  # exactly the values `exmyconv dequantize --dtype` writes
        bias = torch.randn(spec.n, device="cuda", dtype=dtype)
        for rows in (1, 3, 8, 16, 17, 64):
            x = torch.randn(rows, spec.k, device="cuda", dtype=dtype)
            y = spec(x, packed, scale, bias)
            assert y.shape == (rows, spec.n) and y.dtype == dtype and not torch.isnan(y).any()
            if row_spec is not spec:
                assert torch.equal(y, row_spec(x, row_packed, scale, bias)), (variant, name, rows)
            plain = torch.nn.functional.linear(x, w, bias)
            if rows > 16:
                assert torch.equal(y, plain), (variant, name, rows)
            else:
                want = torch.nn.functional.linear(x.float(), ref, bias.float())
                err = ((y.float() - want).norm() / want.norm()).item()
                assert err < (4e-3 if dtype == torch.float16 else 2e-2), (variant, name, rows, err)
        # float32 scales (a fused layer whose shards stored fp16 and bf16 scales): the torch codec on CUDA
        x = torch.randn(40, spec.k, device="cuda", dtype=dtype)
        assert torch.equal(spec(x, packed, scale.float(), None), torch.nn.functional.linear(x, w))
        # float32 activations: no GEMV; the weight dequantized to float32 by the kernel (exact), then F.linear
        for rows in (1, 40):
            x32 = torch.randn(rows, spec.k, device="cuda")
            want = torch.nn.functional.linear(x32, ref, bias.float())
            assert torch.equal(spec(x32, packed, scale, bias.float()), want), (variant, name, rows)


def test_cuda_graph_capture_and_replay(conversions):
    """prepare(), then one graph with two layers at several batch sizes (GEMV and dequantize + cuBLAS,
    the scratch shared); replays with fresh inputs equal eager calls bit for bit."""
    import torch

    dtype = torch.bfloat16
    layers = [_layer(conversions["e2m2s4-g64"]["model.layers.0.self_attn.qkv.weight"]),
              _layer(conversions["e2m2"]["model.layers.0.mlp.down_proj.weight"])]
    (a, pa, sa, _), (b, pb, sb, _) = layers
    for spec, packed, scale, _ in layers:
        assert spec.prepare(packed, scale, dtype)

    def forward(x):  # qkv-shaped layer, then a down_proj-shaped one fed from a slice of it
        h = a(x, pa, sa)
        return b(torch.nn.functional.pad(h, (0, b.k - a.n)), pb, sb)

    for rows in (1, 4, 16, 40):
        static_x = torch.randn(rows, a.k, device="cuda", dtype=dtype)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on the capture stream: its plans are made here
            forward(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            static_y = forward(static_x)
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_y, forward(static_x)), rows
