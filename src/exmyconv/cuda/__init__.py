"""The GPU: the one GPU probe (``device``), CUDA kernel loading and launch, the bit-exact GPU dequantizer
and the fused GEMV with its planning (``gpu``), programmatic dependent launch (``launch``).

The CUDA C sources are the repository's ``kernels/`` (shipped in the wheel as ``exmyconv/kernels``).
Imports: ``format`` (and ``errors``); CuPy and torch only inside functions.
"""


def backend():
    """:mod:`exmyconv.cuda.gpu` when the CUDA path can run here (``device.available()``), else None.

    Never raises: a broken CuPy install makes the callers take their CPU paths.
    """
    from . import device

    if not device.available():
        return None
    try:
        from . import gpu
    except Exception:
        return None
    return gpu
