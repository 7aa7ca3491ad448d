"""Every reader of a converted checkpoint, run the same way, so tests can require that they agree.

``run_readers(path)`` -> {reader: Verdict}: the CLI's ``inspect``, ``verify`` and ``dequantize`` (in
process, exit status and output as a user sees them), ``exmyconv.load_state_dict``, and the
transformers loader's own entry points (``ExmyConfig`` from config.json's quantization_config, then
``read_records``, which the quantizer calls before any weight loads), and where vLLM is installed
(scripts/ci-vllm's environment) the vLLM plugin's (``ExmyConfig.from_config``, then ``read_layout``,
which vLLM calls before it builds the model). ``agree(verdicts)`` checks what
the issue asks of them: no traceback or internal error, one line per message, all accept or all
refuse, and refusals that name the same problem.
"""
from __future__ import annotations

import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from conftest import cli_call
from exmyconv.errors import ExmyError


@dataclass
class Verdict:
    ok: bool
    message: str = ""  # the refusal's one line (without "error: "), or the first listed problem
    code: int | None = None
    output: str = ""




def _cli_verdict(*args) -> Verdict:
    code, out, err = cli_call(*args)
    text = out + err
    if code == 0:
        return Verdict(True, "", code, text)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code == 1 and len(lines) == 1 and lines[0].startswith("error: "):
        return Verdict(False, lines[0][len("error: "):], code, text)
    if code == 2:  # a report that lists problems
        problems = [ln.strip()[2:] for ln in out.splitlines() if ln.startswith("    - ")]
        if problems:
            return Verdict(False, problems[0], code, text)
    return Verdict(False, f"UNCLEAN (exit {code}): {text[-2000:]}", code, text)


def _call(fn) -> Verdict:
    try:
        fn()
    except (ExmyError, ValueError) as err:  # transformers' config errors are ValueErrors
        return Verdict(False, str(err), None, f"{type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - reported as unclean
        return Verdict(False, f"UNCLEAN {type(err).__name__}: {err}", None, repr(err))
    return Verdict(True)


def _transformers(path: Path) -> None:
    from exmyconv.integrations.transformers_impl import ExmyConfig, read_records

    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    try:  # what transformers' AutoConfig reads (it has its own errors for broken JSON: not ours to test)
        config = json.loads(config_file.read_text()) if path.is_dir() and config_file.is_file() else None
    except (ValueError, RecursionError):
        config = None
    if config is not None:
        qc = config.get("quantization_config") if isinstance(config, dict) else None
        if isinstance(qc, dict) and qc.get("quant_method") == "exmy":
            ExmyConfig.from_dict(dict(qc))
    # (no weight file: transformers looks for model.safetensors, and our reader sees the folder as it is)
    files = (sorted(folder.glob("*.safetensors")) or [folder / "model.safetensors"]) if path.is_dir() else [path]
    read_records(files)


def _exmy_quantization_config(folder: Path):
    """config.json's exmy quantization_config as an engine reads it (its own JSON parser), else None."""
    config_file = folder / "config.json"
    try:  # broken JSON is the engine's to report, not ours to test
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
    except (ValueError, RecursionError):
        config = None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return dict(qc) if isinstance(qc, dict) and qc.get("quant_method") == "exmy" else None


_VLLM = importlib.util.find_spec("vllm")
# (without vLLM, the folder tests/vllm is found as a namespace package "vllm", which has no origin)
HAVE_VLLM = _VLLM is not None and _VLLM.origin is not None


def _vllm(path: Path) -> None:
    from exmyconv.integrations.vllm_impl import ExmyConfig, read_layout

    qc = _exmy_quantization_config(path)
    if qc is not None:
        ExmyConfig.from_config(qc)
    read_layout(str(path))


def run_readers(path, transformers: bool = True, exmy: bool | None = None) -> dict[str, Verdict]:
    """``exmy=False``: a plain checkpoint (verify, dequantize and transformers are for exmy ones only);
    None: decide by what the checkpoint holds (exmy records, or an exmy quantization_config)."""
    import exmyconv
    from exmyconv.io.checkpoint import Checkpoint

    path = Path(path)
    if exmy is None:
        try:
            with Checkpoint(str(path)) as ckpt:
                exmy = ckpt.is_exmy
        except ExmyError:
            exmy = True  # unreadable: every reader must refuse it alike
    verdicts = {"inspect": _cli_verdict("inspect", path),
                "load_state_dict": _call(lambda: exmyconv.load_state_dict(str(path)))}
    if exmy:
        verdicts["verify"] = _cli_verdict("verify", path, "--no-gpu")
        if path.is_dir():
            with tempfile.TemporaryDirectory() as tmp:
                verdicts["dequantize"] = _cli_verdict("dequantize", path, Path(tmp) / "fp")
        if transformers:
            verdicts["transformers"] = _call(lambda: _transformers(path))
        if HAVE_VLLM and path.is_dir():  # vLLM serves folders (and Hub repos), not single files
            verdicts["vllm"] = _call(lambda: _vllm(path))
    return verdicts


def agree(verdicts: dict[str, Verdict], what: str = "") -> Verdict:
    """Assert that the readers agree; return the reference verdict (inspect's)."""
    for name, v in verdicts.items():
        assert "UNCLEAN" not in v.message, f"{what}: {name}: {v.message}"
        assert "Traceback" not in v.output and "internal error" not in v.output, f"{what}: {name}: {v.output}"
        assert "\n" not in v.message and "\r" not in v.message, f"{what}: {name}: message of several lines"
    ref = verdicts["inspect"]
    oks = {name: v.ok for name, v in verdicts.items()}
    assert len(set(oks.values())) == 1, f"{what}: readers disagree: {oks}; " + "; ".join(
        f"{n}: {v.message}" for n, v in verdicts.items() if not v.ok)
    if not ref.ok:
        for name, v in verdicts.items():
            assert ref.message in v.message or v.message in ref.message, (
                f"{what}: {name} refuses for another reason:\n  inspect: {ref.message}\n  {name}: {v.message}")
    return ref
