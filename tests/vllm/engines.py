"""Small random-weight models built from real transformers configs, their conversions, and vLLM engines.

Shared by the vLLM tests; imports vLLM only inside functions. A model folder looks like a Hub
checkpoint: safetensors weights in bfloat16, config.json, and a word-level tokenizer of the model's
vocabulary (``<unk>``, ``<s>``, ``</s>``, then ``t3`` .. ``t511``), so that ``vllm serve`` can answer
text requests.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from pathlib import Path

import exmyconv

SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
PROMPTS = [[1, 5, 9, 33, 200, 7], list(range(3, 43)), [11] * 3 + [400, 401, 402, 99, 98]]
MAX_TOKENS = 12


def configs() -> dict:
    from transformers import LlamaConfig, MixtralConfig, Qwen3Config, Qwen3MoeConfig

    return {
        "llama": LlamaConfig(**SMALL, tie_word_embeddings=False),
        "qwen3": Qwen3Config(**SMALL, head_dim=64, tie_word_embeddings=False),
        "qwen3-tied": Qwen3Config(**SMALL, head_dim=64, tie_word_embeddings=True),
        "qwen3moe": Qwen3MoeConfig(**{**SMALL, "intermediate_size": 256}, head_dim=64, moe_intermediate_size=128,
                                   num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
        "mixtral": MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    }


def tokenizer_files(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # special tokens are no prefix of any word ("t2" would split "t200" into "t2" + unknown)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def build(name: str, root: Path, seed: int = 0) -> Path:
    """The random-weight checkpoint ``name`` (see configs()) in bfloat16, built once under ``root``."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = root / name / "src"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs()[name]).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (pname, p) in enumerate(model.named_parameters()):
            if p.dim() < 2:
                continue
            p.mul_(2.0)  # random init is tiny (std 0.02): give the logits some spread
            if i % 3 == 1:  # outlier input channels in some tensors, as real weights have: formats then differ
                p.mul_(torch.exp(torch.randn(p.shape[-1], generator=gen) * 0.8).to(p.dtype))
    model.save_pretrained(folder)
    tokenizer_files(folder, model.config.vocab_size)
    return folder


def convert(src: Path, variant: str, **options) -> tuple[Path, Path]:
    """(converted folder, its ``exmyconv dequantize`` folder), made once per variant."""
    out = src.parent / variant
    plain = src.parent / f"{variant}-dequantized"
    if not (out / "config.json").is_file():
        exmyconv.quantize(str(src), str(out), overwrite=True, **options)
    if not (plain / "config.json").is_file():
        exmyconv.dequantize(str(out), str(plain), overwrite=True)
    return out, plain


@contextlib.contextmanager
def plain_gemm_on_onednn():
    """vLLM's CPU GEMM for plain weights pinned to oneDNN, which gives F.linear's bits
    (test_cpu_gemm_matches_vllms), the GEMM of the packed layers' CPU path. On a CPU with AMX, vLLM 0.32
    runs plain bf16 weights of at most 1 MiB (every weight of these small models) through sgl's
    weight_packed_linear instead (``vllm.model_executor.layers.utils.check_cpu_sgl_kernel``), whose sums
    round differently: greedy tokens of the exmy and the dequantized checkpoint then part at near ties
    (Mixtral, untied auto 4.5, on a Xeon with AMX, 2026-12-07) though both compute on the same weights.
    The token comparisons hold the GEMM fixed so that they compare the weights. An AttributeError here
    means vLLM renamed the switch: the pin would silently do nothing."""
    from vllm.model_executor.layers import utils

    chooser = utils.check_cpu_sgl_kernel
    utils.check_cpu_sgl_kernel = lambda *args, **kwargs: False
    try:
        yield
    finally:
        utils.check_cpu_sgl_kernel = chooser


def generate(path: Path, compiled: bool = False, prompts=PROMPTS, max_tokens: int = MAX_TOKENS) -> dict:
    """Greedy tokens of an in-process vLLM engine on ``path`` (bfloat16, plain weights on oneDNN:
    plain_gemm_on_onednn); the engine is torn down after.

    ``compiled``: vLLM's CPU compilation (Dynamo traces the model once; the graph runs on Dynamo's eager
    backend instead of Inductor, which would cost minutes per engine here) instead of plain eager mode."""
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    os.environ["VLLM_CPU_CI_ENV"] = "1" if compiled else "0"
    began = time.perf_counter()
    with plain_gemm_on_onednn():
        llm = LLM(model=str(path), dtype="bfloat16", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=256,
                  enforce_eager=not compiled, seed=0)
    loaded = time.perf_counter()
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        layers = _layer_methods(llm)
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    return {"tokens": tokens, "methods": layers, "load_s": loaded - began, "total_s": time.perf_counter() - began}


def _layer_methods(llm) -> dict:
    """{layer name: quant method class name} of the engine's model (in-process engines only)."""
    def collect(worker):
        model = worker.model_runner.model
        return {name: type(m.quant_method).__name__ for name, m in model.named_modules()
                if getattr(m, "quant_method", None) is not None}

    try:
        return llm.collective_rpc(collect)[0]
    except Exception as err:  # the introspection is a convenience of the tests, not what they prove
        return {"?": f"{type(err).__name__}: {err}"}


def sidecar(out: Path) -> dict:
    return json.loads((out / "exmy_search.json").read_text())
