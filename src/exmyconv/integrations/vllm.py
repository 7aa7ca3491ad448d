"""vLLM plugin: exmy checkpoints served by vLLM with no flag (``pip install exmyconv[vllm]``).

    vllm serve out/model-e2m2                 # config.json's quantization_config selects "exmy"
    LLM(model="out/model-e2m2")

The package declares this module's :func:`register` as an entry point of the group
``vllm.general_plugins``; vLLM calls it in each of its processes (front end, engine, workers) before it
reads any model config. It registers the quantization method ``exmy``
(:mod:`exmyconv.integrations.vllm_impl`, which imports vLLM and torch) through vLLM's
``register_quantization_config``.

Importing this module imports nothing heavy. :func:`register` never raises: if the implementation
cannot load (an incompatible vLLM, a broken install) it logs one warning line and vLLM goes on
without the method (only exmy checkpoints then fail to load, with vLLM's "unknown quantization method").
It does not use exmyconv's transformers integration, whose supported transformers range may not
include the one vLLM pins.
"""
from __future__ import annotations

import logging

_logger = logging.getLogger("vllm.exmyconv")  # a child of vLLM's logger: vLLM's format and level
_registered = False


def register() -> None:
    """vLLM's plugin hook: register quantization method "exmy" (safe to call more than once)."""
    global _registered
    if _registered:
        return
    try:
        from . import vllm_impl

        vllm_impl.register()
        _registered = True
    except Exception as err:  # never break a vLLM process
        _logger.warning("exmyconv: the 'exmy' quantization method is not available in this vLLM: %s: %s",
                        type(err).__name__, err)
