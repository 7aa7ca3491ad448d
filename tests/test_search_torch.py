"""The torch (GPU) search measurement agrees with the numpy reference; run here on the CPU."""
import numpy as np

from exmyconv.convert import gptq, search, search_torch


def test_measure_matches_reference(rng):
    x = (rng.standard_normal((300, 200)) * 0.03).astype(np.float32)
    x[5] = 0.0
    x[:, 7] *= 20  # an outlier input channel
    cands = search.parse_candidates("e2m2,e2m1-g32,e2m2s4-g64,e2m3s3,e3m2-g100+clip,e4m3")
    importance = rng.uniform(0.1, 5, x.shape[1]).astype(np.float32)

    def chunks():
        yield from (x[:128], x[128:])

    mix = rng.standard_normal((x.shape[1], x.shape[1])) * 0.1 + np.eye(x.shape[1])
    second_moments = (mix @ mix.T).astype(np.float32)  # a [K, K] importance: output error
    factor = gptq.inverse_factor(second_moments)
    for imp, fac in ((None, None), (importance, None), (second_moments, None), (second_moments, factor)):
        want = search.measure(chunks, cands, imp, fac)
        got = search_torch.measure(chunks, cands, imp, fac)
        assert np.all(np.isfinite(got)) and np.allclose(got, want, rtol=1e-5, atol=0)
    assert (want < search.measure(chunks, cands, second_moments)).all()  # GPTQ's errors, not nearest rounding's
