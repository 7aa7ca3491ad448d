"""vLLM quantization method "exmy": the config (:class:`ExmyConfig`) and its registration.

Imported by :func:`exmyconv.integrations.vllm.register` inside vLLM processes only. It imports vLLM's
quantization base classes; the layer methods (:mod:`exmyconv.integrations.vllm_layers`, which import
vLLM's layer modules) load when vLLM first asks for a method, while it builds the model.

Where the per-tensor layout comes from: config.json's ``quantization_config`` selects the method and
gives the conversion defaults, but a ``--format auto`` checkpoint has a format per tensor, so the
checkpoint's own headers (the ``exmy:T`` records) are read, and validated, when vLLM finishes its
config (``maybe_update_config``, in the front-end process, which hands the config to the workers).
A Hub repo id is resolved to its local snapshot first (exmyconv's Hub source, the same cache vLLM
uses unless ``--download-dir`` is given). A damaged checkpoint stops vLLM there with the message
``exmyconv dequantize`` prints for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ..errors import ExmyError
from ..format.layout import QUANT_METHOD, VERSION, check_version
from ..io.checkpoint import Checkpoint


def register() -> None:
    """Register ExmyConfig as vLLM's quantization method "exmy"."""
    register_quantization_config(QUANT_METHOD)(ExmyConfig)


def validate(ckpt: Checkpoint) -> None:
    """Refuse a damaged checkpoint with the CLI's message (the one place this module decides validity).

    The shared validation of ``exmyconv.io`` plugs in here: today the reader's integrity findings
    (``Checkpoint.check``: headers, versions, records against their tensors) and every record's scales
    (``Checkpoint.check_scales``), as ``exmyconv dequantize`` checks them."""
    ckpt.check()
    if not ckpt.records:
        raise ExmyError(f"{ckpt.path}: no exmy-quantized tensors, although config.json says quant_method "
                        f"{QUANT_METHOD!r}")
    for name, (_, f) in ckpt.records.items():
        bad = ckpt.check_scales(name)
        if bad:
            raise ExmyError(f"{f.path}: damaged exmy checkpoint: {bad}")


def read_layout(model: str, revision: str | None = None) -> dict:
    """{checkpoint tensor name: (TensorRecord, scale dtype "F16"/"BF16")} of a checkpoint folder or Hub repo."""
    path = model
    if not Path(model).exists():  # only a name that is no local path reaches the Hub code
        from ..io.hub import is_repo_id, resolve_source

        path = str(resolve_source(model, revision)) if is_repo_id(model) else model
    with Checkpoint(path) as ckpt:
        validate(ckpt)
        return {name: (record, f.tensors[record.scale_name].dtype) for name, (record, f) in ckpt.records.items()}


class ExmyConfig(QuantizationConfig):
    """The ``quantization_config`` of an exmy checkpoint (formats/SPEC.md section 4), plus its records.

    ``tensors`` maps each quantized tensor, by its name in vLLM's model (the checkpoint name after
    the model's renames), to (TensorRecord, scale dtype); it is filled from the checkpoint's headers.
    """

    def __init__(self, format: str | None = None, group_size: int | None = None, ignore=(),
                 format_version: str = VERSION):
        super().__init__()
        check_version(str(format_version), "quantization_config")
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
        return cls(format=config.get("format"), group_size=config.get("group_size"), ignore=config.get("ignore"),
                   format_version=str(config.get("format_version", "?")))

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
