"""The torch (GPU) search measurement agrees with the numpy reference; run here on the CPU."""
import numpy as np
import pytest
import torch

from exmyconv import formats, search, search_torch


@pytest.mark.parametrize("name", ["e2m2", "e2m1", "e3m2", "e4m3", "e2m0", "e1m0", "e5m2", "e2m2s4", "e2m3s3"])
def test_codes_match_reference(name, rng):
    fmt = formats.get_format(name)
    y = (rng.standard_normal((8, 300)) * fmt.max / 3).astype(np.float32)
    y[0, :3] = [0.0, -0.0, fmt.max * 2]
    mags = fmt.table[: 2 ** (fmt.e + fmt.m)]
    ties = (mags[1:] + mags[:-1]) / 2
    y[1, : ties.size] = ties[:300]
    weight = rng.uniform(0.5, 2, y.shape)
    want = fmt.encode(y, weight if fmt.share > 1 else None)
    got = search_torch.encode(fmt, torch.from_numpy(y), torch.from_numpy(weight) if fmt.share > 1 else None)
    assert np.array_equal(got.numpy().astype(np.uint8), want)


def test_measure_matches_reference(rng):
    x = (rng.standard_normal((300, 200)) * 0.03).astype(np.float32)
    x[5] = 0.0
    x[:, 7] *= 20  # an outlier input channel
    cands = search.parse_candidates("e2m2,e2m1-g32,e2m2s4-g64,e2m3s3,e3m2-g100+clip,e4m3")
    importance = rng.uniform(0.1, 5, x.shape[1]).astype(np.float32)

    def chunks():
        yield from (x[:128], x[128:])

    for imp in (None, importance):
        want = search.measure(chunks, cands, imp)
        got = search_torch.measure(chunks, cands, imp)
        assert np.all(np.isfinite(got)) and np.allclose(got, want, rtol=1e-5, atol=0)
