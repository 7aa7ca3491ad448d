"""Launch-shape rules of the GPU kernels (host code: runs without a GPU)."""
from __future__ import annotations

import pytest

from exmyconv.cuda import gpu
from exmyconv.cuda.gpu import GemvKernel
from exmyconv.format.exmy import get_format

H100_SMS = 132


@pytest.mark.parametrize("grid, want", [
    (320, 3),   # 5120-row layer at 8 slices: 1.21 waves at 2 per SM (fill 0.61), 0.81 at 3
    (384, 3),   # 12288 rows at 4 slices: fill 0.73 at 2 per SM, 0.97 at 3
    (512, 2),   # 8192 rows at 8 slices: 0.97 at 2, 0.65 at 3
    (256, 2),   # 4096 rows at 8 slices: 0.97 at 2, 0.65 at 3
    (224, 2),   # 3584 rows: 0.85 at 2, 0.57 at 3
    (768, 2),   # 0.97 either way: the 128-register build
    (264, 2),   # exactly one wave at 2 per SM
    (396, 3),   # exactly one wave at 3 per SM (fill 0.75 at 2)
    (1, 2),
])
def test_b1r_blocks_per_sm_follow_the_fuller_last_wave(grid, want):
    for name in ("e2m1", "e2m2", "e3m1", "e4m3", "e2m2s4"):
        for mode in (0, 1):  # fp16 operands: scale folded, two steps
            kernel = GemvKernel("b1r", mode, "F16", 0, 2)
            assert gpu.gemv_b1r_blocks(kernel, grid, get_format(name), H100_SMS) == want, (name, kernel, grid)


def test_b1r_three_blocks_only_for_fp16_operands_one_scale_and_not_six_bits():
    fmt = get_format("e2m1")
    for kernel in (GemvKernel("b1r", 2, "F16", 0, 2), GemvKernel("b1r", 2, "BF16", 0, 2),
                   GemvKernel("b1r", 0, "F16", 1, 2), GemvKernel("b1r", 1, "F16", 2, 2),
                   GemvKernel("b1r", 2, "BF16", 1, 2)):
        assert gpu.gemv_b1r_blocks(kernel, 320, fmt, H100_SMS) == 2, kernel
    for name in ("e2m3", "e3m2", "e2m3s3"):
        assert gpu.gemv_b1r_blocks(GemvKernel("b1r", 0, "F16", 0, 2), 320, get_format(name), H100_SMS) == 2, name


def test_register_budget_of_the_other_kinds():
    """3 blocks per SM (80 registers) for b1 and nt1 with the row scale applied to the sums (modes 0,
    1, 3), one scale per row and codes of <= 5 bits; 2 for everything else, and for b1r unless its launch asks for 3."""
    for name in ("e2m1", "e2m2", "e3m1", "e2m2s4", "e1m3"):
        fmt = get_format(name)
        for kind in ("b1", "nt1"):
            for mode in (0, 1, 3):
                assert gpu.gemv_blocks(fmt, kind, mode, 0) == 3, (name, kind, mode)
                assert gpu.gemv_blocks(fmt, kind, mode, 1) == 2, (name, kind, mode)
            assert gpu.gemv_blocks(fmt, kind, 2, 0) == 2, (name, kind)
        assert gpu.gemv_blocks(fmt, "nt2", 0, 0) == 2 and gpu.gemv_blocks(fmt, "b1r", 0, 0) == 2, name
    for name in ("e2m3", "e3m2", "e4m3", "e2m3s3"):
        assert gpu.gemv_blocks(get_format(name), "b1", 0, 0) == 2, name


def test_kernel_record_names_the_instantiation_and_keeps_report_names():
    assert GemvKernel("b1r", 0, "F16", 1, 2).expression == "exmy_gemv<3, 0, true, 1, 2, false>"
    assert GemvKernel("b1", 2, "BF16", 0, 2).expression == "exmy_gemv<0, 2, false, 0, 2, false>"
    assert GemvKernel("nt1", 1, "F16", 0, 3, tiled=True).expression == "exmy_gemv<1, 1, true, 0, 3, true>"
    assert GemvKernel("b1", 0, "F16", 0, 3, routed=True).expression == "exmy_gemv_routed<0, 0, true, 0, 3>"
    # the names of the kernels before the template (benchmark rows stay comparable)
    assert GemvKernel("b1", 0, "F16", 0, 3).name == "exmy_gemv_fold_x16_b1"
    assert GemvKernel("nt1", 1, "F16", 1, 2).name == "exmy_gemv_two_x16_nt1_g"
    assert GemvKernel("nt2", 2, "F16", 2, 2).name == "exmy_gemv_bf_x16_nt2_ga"
    assert GemvKernel("b1r", 2, "BF16", 0, 2).name == "exmy_gemv_bf_xbf_b1r"
    assert GemvKernel("b1r", 0, "F16", 0, 3).name == "exmy_gemv_fold_x16_b1r_3blocks"
    assert GemvKernel("nt2w", 0, "F16", 0, 2, tiled=True).name == "exmy_gemv_fold_x16_nt2w_xt"
    assert GemvKernel("nt2w", 5, "BF16", 0, 2, tiled=True).name == "exmy_gemv_bfx16p_xbf_nt2w"


class _OneDevice:  # what gemv_wide / gemv_split ask CuPy for: the current device's id (sm_count is patched)
    class cuda:
        class Device:
            id = 0


@pytest.fixture
def sms_132(monkeypatch):
    monkeypatch.setattr(gpu, "_cupy", lambda: _OneDevice)
    monkeypatch.setattr(gpu, "sm_count", lambda device: 132)


@pytest.mark.parametrize("k, n, fmt, ngroups, batch, kind, split", [
    # batch 9-16: two row tiles per warp from 6336 rows (four were slower with x tiles: H100,
    # docs/benchmarks.md 2026-12-06 fourteenth session), K slices for about one wave at two blocks per SM
    (4096, 14336, "e2m2", 1, 16, "nt2w", 4),
    (8192, 28672, "e2m1", 1, 12, "nt2w", 2),
    (28672, 8192, "e2m2", 1, 9, "nt2w", 8),
    (14336, 4096, "e2m2", 1, 16, "nt2", 8),   # 4096 rows: two-tile warps would fill too little of the GPU
    (4096, 4096, "e2m2", 1, 16, "nt2", 8),
    (4096, 14336, "e2m2", 128, 16, "nt2w", 4),  # aligned scale groups alike
    (4096, 14336, "e3m2", 1, 16, "nt2w", 4),    # 6-bit codes alike
    (8192, 28672, "e4m3", 1, 16, "nt2", 8),     # (8-bit codes: one, not measured with two)
    # batch 2-8 by the same rule (6-bit codes too: H200, sixteenth session)
    (4096, 14336, "e2m2", 1, 8, "nt1w", 4),
    (8192, 28672, "e2m3", 1, 2, "nt1w", 8),
    (14336, 4096, "e2m2", 1, 4, "nt1", 8),
    (14336, 4096, "e3m2", 1, 4, "nt1", 8),
    # batch 1: nt1w instead of b1r on wide layers of unshared formats (H100 and H200, twenty-fourth and
    # nineteenth sessions); b1 where x fits its staging; b1r on narrow layers and for the shared formats
    (28672, 8192, "e2m2", 1, 1, "nt1w", 8),
    (28672, 8192, "e3m2", 1, 1, "nt1w", 8),
    (28672, 8192, "e2m1", 1, 1, "nt1w", 8),
    (28672, 8192, "e2m2s4", 1, 1, "b1r", 4),
    (14336, 4096, "e2m2", 1, 1, "b1r", 8),
    (8192, 28672, "e2m2", 1, 1, "b1", 8),
    (4096, 14336, "e3m2", 1, 1, "b1", 2),
])
def test_batch_kernel_and_split_on_132_sms(sms_132, k, n, fmt, ngroups, batch, kind, split):
    from types import SimpleNamespace

    weight = SimpleNamespace(n=n, k=k, fmt=get_format(fmt), ngroups=ngroups, order="row")
    assert gpu._gemv_kind(weight, batch) == kind
    assert gpu.gemv_split(n, k, weight.fmt, kind, gpu.gemv_tile_rows(kind)) == split
    if batch == 1:  # a routed pair's GEMV is always the batch-1 kernel b1 / b1r (exmy_gemv_routed)
        assert gpu._gemv_kind(weight, 1, routed=True) == ("b1" if kind == "b1" else "b1r")


def test_x_tiles_rule():
    """x tiles for mode 5 and for batch 9..16: always with fp16 operands (modes 0, 1), from 2^24 weights
    with bf16 operands (modes 2, 3); never for the batch 1..8 kinds outside mode 5."""
    big, small = 1 << 24, (1 << 24) - 1
    for kind in ("nt2", "nt2w"):
        assert all(gpu.gemv_tiled(kind, mode, small) for mode in (0, 1, 5))
        assert not any(gpu.gemv_tiled(kind, mode, small) for mode in (2, 3))
        assert all(gpu.gemv_tiled(kind, mode, big) for mode in (0, 1, 2, 3, 5))
    for kind in ("b1", "b1r", "nt1", "nt1w"):
        assert not any(gpu.gemv_tiled(kind, mode, big) for mode in (0, 1, 2, 3, 4))
    assert all(gpu.gemv_tiled(kind, 5, 1) for kind in ("nt1", "nt1w", "nt2", "nt2w"))


def test_bf16_x_takes_x_as_scaled_fp16(sms_132):
    """bf16 x with E <= 4 and one scale per row: b1 and b1r take x as scaled fp16 themselves (mode 4),
    the batch 2..16 kinds (and a forced nt1 at batch 1) take it converted before the launch (mode 5,
    with a workspace) for layers of >= 2^26 weights, from batch 9 on >= 2^24, and always in nt1w (two row
    tiles per warp), else mode 3; scale groups
    and 5-bit exponents mode 2, fp16 x modes 0 / 1. b1 in mode 4 splits large layers in 4 (staging x per
    two tiles), where mode 3 and fp16 x take 8."""
    from types import SimpleNamespace

    def weight(name, n, k, ngroups=1):
        return SimpleNamespace(n=n, k=k, fmt=get_format(name), ngroups=ngroups, group_size=k // ngroups, order="row",
                               fp16_compute=get_format(name).e <= 4, fold_ok=lambda: True)

    for name in ("e2m2", "e2m1", "e3m2", "e4m3", "e2m2s4"):
        assert gpu.gemv_kernel(weight(name, 4096, 4096), "BF16", 1).mode == 4, name
        assert gpu.gemv_kernel(weight(name, 4096, 14336), "BF16", 1).kind == "b1r"
        assert gpu.gemv_kernel(weight(name, 4096, 14336), "BF16", 1).mode == 4, name
        assert gpu.gemv_kernel(weight(name, 4096, 4096), "BF16", 1, "nt1").mode == 3, name
        assert gpu.gemv_kernel(weight(name, 28672, 4096), "BF16", 1, "nt1").mode == 5, name
        for batch in (2, 8, 16):
            assert gpu.gemv_kernel(weight(name, 4096, 4096), "BF16", batch).mode == (5 if batch > 8 else 3), name
            assert gpu.gemv_kernel(weight(name, 1024, 4096), "BF16", batch).mode == 3, (name, batch)
            assert gpu.gemv_kernel(weight(name, 28672, 4096), "BF16", batch).mode == 5, (name, batch)
            assert gpu.gemv_kernel(weight(name, 4096, 14336), "BF16", batch).mode == (5 if batch > 8 else 3), name
            # 4096 -> 14336 (under 2^26 weights): two row tiles per warp (nt1w / nt2w, codes of <= 6 bits): mode 5 at
            # batch 2..8 in nt1w, and from 2^24 weights at 9..16
            wide = get_format(name).bits <= 6
            assert gpu.gemv_kernel(weight(name, 14336, 4096), "BF16", batch).kind in (
                ("nt1w", "nt2w") if wide else ("nt1", "nt2")), name
            assert gpu.gemv_kernel(weight(name, 14336, 4096), "BF16", batch).mode == (5 if wide or batch > 8 else 3), name
            assert gpu.gemv_kernel(weight(name, 14336, 4096), "BF16", batch, "nt1" if batch <= 8 else "nt2").mode == (
                5 if batch > 8 else 3), (name, batch)
            assert gpu.gemv_kernel(weight(name, 28672, 4096, 32), "BF16", batch).mode == 2, (name, batch)
        assert gpu.gemv_kernel(weight(name, 4096, 4096, 32), "BF16", 1).mode == 2, name
        assert gpu.gemv_kernel(weight(name, 4096, 4096), "F16", 1).mode == 0, name
    assert gpu.gemv_kernel(weight("e5m2", 4096, 4096), "BF16", 1).mode == 2
    fmt = get_format("e2m2")
    for n, k in ((28672, 4096), (28672, 8192)):
        assert gpu.gemv_split(n, k, fmt, "b1", gpu.GEMV_ROWS, 4) == 4
        assert gpu.gemv_split(n, k, fmt, "b1", gpu.GEMV_ROWS, 3) == 8
        assert gpu.gemv_split(n, k, fmt, "b1", gpu.GEMV_ROWS, 0) == 8
    assert gpu.gemv_split(4096, 4096, fmt, "b1", gpu.GEMV_ROWS, 4) == gpu.gemv_split(4096, 4096, fmt, "b1")


def test_kind_override_fits_the_batch():
    """Tests and benchmarks may force nt1 / nt1w at batch 1..8 and nt2 / nt2w at 9..16, and at batch 1 the
    staged kind (b1 where x fits its staging, else b1r); nothing else (nt2q, four row tiles per warp, is gone)."""
    from types import SimpleNamespace

    from exmyconv.errors import ExmyError

    weight = SimpleNamespace(n=64, k=256, fmt=get_format("e2m2"), ngroups=1, order="row")
    for batch, kind in ((1, "nt2"), (1, "b1r"), (2, "b1"), (8, "nt2q"), (9, "nt1"), (16, "b1r")):
        with pytest.raises(ExmyError, match="can be chosen"):
            gpu.gemv_kernel(weight, "F16", batch, kind)


def test_build_define_reads_values_as_the_compiler_does():
    """gpu.build_define: "NAME=V" gives V, a bare "NAME" 1 (as -DNAME), absent 0; the last one given wins;
    a name that only begins like another is another macro. GEMV_CPT <= 0 keeps the tuned chunks per lane."""
    assert gpu.build_define(("GEMV_CPT=4", "GEMV_PP=-1"), "GEMV_CPT") == 4
    assert gpu.build_define(("GEMV_CPT=4", "GEMV_PP=-1"), "GEMV_PP") == -1
    assert gpu.build_define(("GEMV_DIAG",), "GEMV_DIAG") == 1
    assert gpu.build_define(("GEMV_CPTX=1", "GEMV_DIAG=7"), "GEMV_CPT") == 0
    assert gpu.build_define(("GEMV_CPT=2", "GEMV_CPT=4"), "GEMV_CPT") == 4
    fmt = get_format("e2m2")
    assert gpu._gemv_shape(fmt, "b1", ("GEMV_CPT=4",)) == (4, 16)
    assert gpu._gemv_shape(fmt, "b1", ("GEMV_CPT=0",)) == gpu._gemv_shape(fmt, "b1", ("GEMV_CPT=-1",)) == (2, 8)
    assert gpu._gemv_shape(fmt, "nt2", ()) == (1, 4)


def test_gemv_grid_covers_the_units():
    """A launch has one block per block-unit (8 / split tiles); routed launches a grid row per pair."""
    assert gpu._gemv_grid(28672, 16, 8) == (1792,)             # b1 on 8192 -> 28672: a tile per block
    assert gpu._gemv_grid(28672, 16, 4) == (896,)              # two tiles per block
    assert gpu._gemv_grid(28672 + 1, 16, 8) == (1793,)         # a last tile of one row
    assert gpu._gemv_grid(8192, 32, 2) == (64,)                # nt2w: 4 tiles of 32 rows per block
    assert gpu._gemv_grid(1536, 16, 8, pairs=12) == (96, 12)   # routed: a grid row per pair


def test_kernel_scales_are_complete_before_any_launch_reads_them(monkeypatch):
    """The derived scales are computed on CuPy's stream, which is waited for once per mode: a GEMV
    on torch's stream, or one launched early by programmatic dependent launch (it loads its scales
    before its griddepcontrol.wait), must not read them half-written. CuPy stood in by numpy."""
    import numpy as np
    from types import SimpleNamespace

    waits = []
    stream = SimpleNamespace(synchronize=lambda: waits.append(1))
    fake = SimpleNamespace(float16=np.float16, float32=np.float32, uint16=np.uint16, uint32=np.uint32,
                           ascontiguousarray=np.ascontiguousarray,
                           cuda=SimpleNamespace(get_current_stream=lambda: stream))
    monkeypatch.setattr(gpu, "_cupy", lambda: fake)
    rng = np.random.default_rng()
    fmt = get_format("e2m2")
    scales = (rng.random((6, 1), dtype=np.float32) + 0.5).astype(np.float16)
    weight = gpu.GpuWeight(fmt, (6, 64), 64, "F16", np.zeros((6, 48), np.uint8), scales.view(np.uint16))
    folded = weight.kernel_scales(0)
    want = (scales.astype(np.float32) * np.float32(2.0 ** (15 - fmt.bias))).astype(np.float16)
    assert np.array_equal(folded.view(np.float16), want) and len(waits) == 1
    assert weight.kernel_scales(0) is folded and len(waits) == 1  # cached: no second wait
    assert np.array_equal(weight.kernel_scales(2), scales.astype(np.float32)) and len(waits) == 2


def test_tile_order_applies_where_it_was_measured_faster(sms_132):
    """upload's order (gpu.tile_order_applies): tile order for unshared formats on whole 16-row tiles and
    128-element blocks, but row order for 4-bit-only codes where batch 1 runs b1r (slower in tile order
    on both GPUs measured: narrow layers with K past b1's staging, routed pairs); the structural conditions alone (_tileable) decide what tile_order accepts."""
    e2m1, e2m2, e3m2, e4m3 = (get_format(n) for n in ("e2m1", "e2m2", "e3m2", "e4m3"))
    for fmt in (e2m2, e3m2, e4m3):
        assert all(gpu.tile_order_applies(fmt, n, k) for n, k in ((4096, 4096), (28672, 8192), (8192, 28672), (16, 100)))
    assert gpu.tile_order_applies(e2m1, 14336, 4096) and not gpu.tile_order_applies(e2m1, 4096, 14336)
    # K past b1's staging on a wide layer: batch 1 runs nt1w, not b1r, but for routed pairs (stacked experts)
    assert gpu.gemv_wide(8192, e2m1) and not gpu.gemv_wide(4096, e2m1)
    assert gpu.tile_order_applies(e2m1, 8192, 28672) and not gpu.tile_order_applies(e2m1, 8192, 28672, routed=True)
    assert gpu.tile_order_applies(e2m2, 8192, 28672, routed=True)
    assert gpu._tileable(e2m1, 4096, 14336)
    assert not gpu.tile_order_applies(e2m2, 4100, 4096)      # a partial tile
    assert not gpu.tile_order_applies(e2m2, 4096, 4000)      # Kp = 4000 is not whole blocks
    assert not gpu.tile_order_applies(get_format("e2m2s4"), 4096, 4096)  # shared bits: row order only


@pytest.mark.parametrize("name", ["e2m2", "e3m2", "e2m1", "e4m3", "e3m3", "e1m1"])
def test_tile_permuted_puts_each_chunk_where_the_docs_say(name):
    """gpu.tile_permuted (numpy here; the GPU copy runs the same code on cupy, the torch layers on torch
    tensors) against the placement
    docs/kernels.md gives, element by element: chunk c of row r in the w-bit plane starts at
    16 * rb * (r // 16) + 256 * bits * (c // 4) + 64 * (chunk bytes of the wider planes) + (r % 16) * 16w
    + (c % 4) * 4w, where row order has it at r * rb + (Kp * bits of the wider planes) / 8 + c * 4w."""
    import numpy as np
    import torch

    from exmyconv.format.pack import row_bytes

    rng = np.random.default_rng(5)
    fmt = get_format(name)
    for n, k in ((16, 128), (48, 384), (32, 100)):  # (K = 100: Kp = 128)
        kp, rb = -(-k // 32) * 32, row_bytes(fmt, k)
        rows = rng.integers(0, 256, (n, rb), dtype=np.uint8)
        tiled = gpu.tile_permuted(rows, fmt, k)
        assert tiled.shape == (n, rb) and tiled.flags.c_contiguous
        flat, wider = tiled.reshape(-1), 0
        for w in fmt.planes:
            for r in range(n):
                for c in range(kp // 32):
                    src = rows[r, kp * wider // 8 + c * 4 * w:][:4 * w]
                    at = 16 * rb * (r // 16) + 256 * fmt.bits * (c // 4) + 64 * 4 * wider + (r % 16) * 16 * w + (c % 4) * 4 * w
                    assert np.array_equal(flat[at:at + 4 * w], src), (name, n, k, w, r, c)
            wider += w
        assert sorted(flat.tolist()) == sorted(rows.reshape(-1).tolist())  # a permutation of the bytes
        # the same on torch tensors (the layers reorder their own buffers), and row_permuted undoes it
        t = gpu.tile_permuted(torch.from_numpy(rows), fmt, k, torch)
        assert t.is_contiguous() and np.array_equal(t.numpy(), tiled)
        back = gpu.row_permuted(t, fmt, k, torch)
        assert back.is_contiguous() and np.array_equal(back.numpy(), rows)
        assert np.array_equal(gpu.row_permuted(tiled, fmt, k), rows)
