"""vLLM quantization method "exmy": the config (:class:`ExmyConfig`) and its registration.

Imported by :func:`exmyconv.integrations.vllm.register` inside vLLM processes only. It imports vLLM's
quantization base classes; the layer methods (:mod:`exmyconv.integrations.vllm_layers`, which import
vLLM's layer modules) load when vLLM first asks for a method, while it builds the model.

Where the per-tensor layout comes from: config.json's ``quantization_config`` selects the method and
gives the conversion defaults, but a ``--format auto`` checkpoint has a format per tensor, so the
checkpoint's own headers (the ``exmy:T`` records) are read, and validated, when vLLM finishes its
config (``maybe_update_config``, in the front-end process, which hands the config to the workers).
A Hub repo id is resolved to its local snapshot first (exmyconv's Hub source, the same cache vLLM
uses unless ``--download-dir`` is given). The checkpoint is opened with
:func:`exmyconv.io.checkpoint.open_checkpoint`, the reader every exmyconv command uses, so the plugin
accepts and refuses exactly what the CLI does: a damaged checkpoint stops vLLM there with the one-line
message ``exmyconv dequantize`` prints for it. This module decides no validity rule of its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ..errors import ExmyError
from ..format.layout import QUANT_METHOD, VERSION
from ..io.checkpoint import open_checkpoint
from ..io.validate import check_quantization_config


def register() -> None:
    """Register ExmyConfig as vLLM's quantization method "exmy"."""
    register_quantization_config(QUANT_METHOD)(ExmyConfig)


def read_layout(model: str, revision: str | None = None) -> dict:
    """{checkpoint tensor name: (TensorRecord, scale dtype "F16"/"BF16")} of a checkpoint folder or Hub repo.

    ``open_checkpoint`` resolves a Hub repo id itself (its default branch); a ``revision`` is resolved here."""
    path = model
    if revision is not None and not Path(model).exists():  # only a name that is no local path reaches the Hub code
        from ..io.hub import is_repo_id, resolve_source

        path = str(resolve_source(model, revision)) if is_repo_id(model) else model
    with open_checkpoint(path) as ckpt:  # validated as the CLI validates it, or ExmyError (one line)
        return {name: (record, f.tensors[record.scale_name].dtype) for name, (record, f) in ckpt.records.items()}


class ExmyConfig(QuantizationConfig):
    """The ``quantization_config`` of an exmy checkpoint (formats/SPEC.md section 4), plus its records.

    ``tensors`` maps each quantized tensor, by its name in vLLM's model (the checkpoint name after
    the model's renames), to (TensorRecord, scale dtype); it is filled from the checkpoint's headers.
    """

    def __init__(self, format: str | None = None, group_size: int | None = None, ignore=(),
                 format_version: str = VERSION):
        super().__init__()
        self.format, self.group_size, self.ignore = format, group_size, list(ignore or ())
        self.checkpoint: dict | None = None  # by checkpoint name
        self.tensors: dict | None = None  # by vLLM name
        self.claimed: set = set()  # vLLM names of the records a layer method took (the rest: decoded in the stream)
        self._mapper = None

    def __repr__(self) -> str:
        n = "?" if self.checkpoint is None else len(self.checkpoint)
        return f"ExmyConfig(format={self.format}, group_size={self.group_size}, quantized_tensors={n})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the GPU kernels need sm_80 (exmyconv.cuda.device)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config is enough to select the method

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ExmyConfig":
        problems = check_quantization_config(config)  # the rules config.json's readers apply (io.validate)
        if problems:
            raise ExmyError(problems[0])
        return cls(format=config.get("format"), group_size=config.get("group_size"), ignore=config.get("ignore"),
                   format_version=str(config.get("format_version", VERSION)))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        self.read(model_name, revision)

    def read(self, model: str, revision: str | None = None) -> None:
        """Read (and validate) the checkpoint's records."""
        self.checkpoint = read_layout(str(model), revision)
        self._rename()

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self._mapper = hf_to_vllm_mapper
        self._rename()

    def _rename(self) -> None:
        if self.checkpoint is not None:
            self.tensors = (self._mapper.apply_dict(self.checkpoint) if self._mapper is not None
                            else dict(self.checkpoint))

    def get_checkpoint_weight_mapper(self):
        """vLLM's mapper for quantization tensors, plus the decoding of tensors no layer method took."""
        from . import vllm_layers

        return vllm_layers.DecodingMapper.wrap(QuantizationConfig.get_checkpoint_weight_mapper(), self)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if self.tensors is None:  # a path that skipped maybe_update_config: read the model being loaded
            from vllm.config import get_current_vllm_config

            model_config = get_current_vllm_config().model_config
            self.read(model_config.model, model_config.revision)
        from . import vllm_layers

        return vllm_layers.quant_method(self, layer, prefix)
