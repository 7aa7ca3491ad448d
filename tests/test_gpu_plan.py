"""Launch-shape rules of the GPU kernels (host code: runs without a GPU)."""
from __future__ import annotations

import pytest

from exmyconv.cuda import gpu
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
        for kernel in ("exmy_gemv_fold_x16_b1r", "exmy_gemv_two_x16_b1r"):
            assert gpu.gemv_b1r_blocks(kernel, grid, get_format(name), H100_SMS) == want, (name, kernel, grid)


def test_b1r_three_blocks_only_for_fp16_operands_one_scale_and_not_six_bits():
    fmt = get_format("e2m1")
    for kernel in ("exmy_gemv_bf_x16_b1r", "exmy_gemv_bf_xbf_b1r", "exmy_gemv_fold_x16_b1r_g",
                   "exmy_gemv_two_x16_b1r_ga", "exmy_gemv_bf_xbf_b1r_g"):
        assert gpu.gemv_b1r_blocks(kernel, 320, fmt, H100_SMS) == 2, kernel
    for name in ("e2m3", "e3m2", "e2m3s3"):
        assert gpu.gemv_b1r_blocks("exmy_gemv_fold_x16_b1r", 320, get_format(name), H100_SMS) == 2, name
