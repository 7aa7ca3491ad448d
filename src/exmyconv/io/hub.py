"""The Hugging Face Hub as a source: a repo id resolved to a local snapshot of what converting it needs.

Everything goes through huggingface_hub's public API (``HfApi.model_info``, ``hf_hub_download``,
``snapshot_download``), so its settings apply as usual: ``HF_ENDPOINT``, ``HF_HOME``/``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, and its token. Only :mod:`exmyconv.io.source` calls this, and only for a name that
is not a local path: reading a local folder never imports it. Uploading lives in
:mod:`exmyconv.integrations.hub`.
"""
from __future__ import annotations

import fnmatch
import glob
import os
import re
from pathlib import Path

from ..errors import ExmyError
from ..format.layout import CONFIG_FILE, INDEX_FILE
from .validate import read_json

# A Hub repo id: "owner/name" (the owner may be left out only for push: the token's user namespace).
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}")

# Files a conversion needs from a source repo (top level only): weights, index, config, tokenizer, card.
SIDE_FILES = (CONFIG_FILE, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.*", "merges.txt", "*.model", "added_tokens.json",
              "chat_template.jinja", "chat_template.json", "README.md",
              "LICENSE*", "NOTICE*", "USE_POLICY.md")  # the license terms travel with the weights
WEIGHTS = "*.safetensors"


def is_repo_id(text: str) -> bool:
    """``owner/name`` that names no existing local path."""
    return (isinstance(text, str) and "/" in text and _REPO_ID.fullmatch(text) is not None
            and "--" not in text and ".." not in text and not os.path.exists(text))


def check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.fullmatch(repo_id or "") or "--" in repo_id or ".." in repo_id:
        raise ExmyError(f"{repo_id!r}: not a Hub repo id (expected owner/name)")


def _offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once, when it is imported)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    for line in text.splitlines():
        if line.strip() and not re.fullmatch(r"\d{3} Client Error\.?", line.strip()):
            return line.strip()
    return type(err).__name__


def hub_error(err: BaseException, repo_id: str, revision: str | None, writing: bool = False) -> ExmyError | None:
    """One clear line for a huggingface_hub / HTTP failure; None if ``err`` is none of those."""
    try:
        from huggingface_hub import errors as e
    except ImportError:  # huggingface_hub < 0.24
        from huggingface_hub import utils as e
    rev = f" (revision {revision!r})" if revision else ""
    where = endpoint()
    login = "set HF_TOKEN or run `hf auth login`"
    if isinstance(err, e.GatedRepoError):
        return ExmyError(f"{repo_id}: gated repository: accept its conditions on {where}/{repo_id} "
                         f"with your account, then {login}")
    if isinstance(err, e.RevisionNotFoundError):
        return ExmyError(f"{repo_id}: revision {revision or 'main'!r} not found")
    if isinstance(err, e.RepositoryNotFoundError):
        local = "" if writing else "not a local folder, and "
        return ExmyError(f"{repo_id}: {local}no such model repository on {where}, or it is private and "
                         f"your token cannot see it ({login})")
    if isinstance(err, (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled)):
        return ExmyError(f"{repo_id}{rev}: not in the Hub cache and offline mode is on "
                         f"(HF_HUB_OFFLINE): download it once with network access")
    if isinstance(err, e.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status == 401:
            return ExmyError(f"{repo_id}: not authorized by {where} ({login})")
        if status == 403:
            what = "write to" if writing else "read"
            return ExmyError(f"{repo_id}: your token may not {what} this repository (HTTP 403: "
                             f"{_first_line(err)})")
        return ExmyError(f"{repo_id}: Hub request failed (HTTP {status}): {_first_line(err)}")
    if _network_error(err):
        return ExmyError(f"{repo_id}: cannot reach {where} ({type(err).__name__}: {_first_line(err)})")
    return None


def _network_error(err: BaseException) -> bool:
    """A connection failure or timeout of the HTTP client (no answer from the Hub at all)."""
    module = (type(err).__module__ or "").split(".")[0]
    if module in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
        return "HTTPStatus" not in type(err).__name__ and not hasattr(err, "server_message")
    return isinstance(err, (ConnectionError, TimeoutError)) and type(err).__name__ != "OfflineModeIsEnabled"


# --------------------------------------------------------------------------- Hub as a source

def _wanted(names: list[str], index: dict | None) -> list[str]:
    """The files of a repo listing that a conversion needs (top level only)."""
    top = [n for n in names if "/" not in n]
    if index is not None:
        weight_map = index.get("weight_map")
        shards = weight_map.values() if isinstance(weight_map, dict) else ()  # broken ones: reported later
        weights = sorted({v for v in shards if isinstance(v, str)})
        weights = [w for w in weights if w in top]  # a missing shard is reported when the folder is read
        weights.append(INDEX_FILE)
    else:
        weights = [n for n in top if fnmatch.fnmatch(n, WEIGHTS)]
    side = [n for n in top if any(fnmatch.fnmatch(n, p) for p in SIDE_FILES)]
    return sorted(set(weights + side))


def resolve_source(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in huggingface_hub's cache) what converting ``repo_id`` needs; the snapshot folder.

    Only the weights (the shards the index names, else the top-level ``*.safetensors``), the index, config,
    generation config, tokenizer files, README.md and license files (LICENSE*, NOTICE*, USE_POLICY.md) are
    fetched, never ``*.bin``, ``*.onnx`` or subfolders.
    With HF_HUB_OFFLINE (or when the Hub cannot be reached) the cached snapshot is used.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    check_repo_id(repo_id)
    try:
        if not _offline():
            try:
                info = HfApi().model_info(repo_id, revision=revision)
            except Exception as err:  # noqa: BLE001
                if not _network_error(err):
                    raise
                # No answer from the Hub (as huggingface_hub itself does): use the cache if it has the repo.
                return _cached_source(repo_id, revision, unreachable=hub_error(err, repo_id, revision))
            names = [s.rfilename for s in info.siblings or []]
            index = None
            if INDEX_FILE in names:
                try:
                    index = read_json(Path(hf_hub_download(repo_id, INDEX_FILE, revision=info.sha)))
                except ExmyError as err:
                    raise ExmyError(f"{repo_id}: {err}") from None
            wanted = _wanted(names, index)
            if not any(n.endswith(".safetensors") for n in wanted):
                bins = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
                raise ExmyError(f"{repo_id}: no .safetensors weights in the repository"
                                + (f" (only pickle checkpoints: {', '.join(sorted(bins)[:3])})" if bins else ""))
            # The revision as given (not info.sha), so that the cache records e.g. refs/main for offline use.
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[glob.escape(n) for n in wanted]))
        return _cached_source(repo_id, revision)
    except ExmyError:
        raise
    except Exception as err:  # noqa: BLE001
        mapped = hub_error(err, repo_id, revision)
        if mapped is None:
            raise
        raise mapped from None


def _cached_source(repo_id: str, revision: str | None, unreachable: ExmyError | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # No pattern: completeness is checked below, against what the conversion will actually read.
        root = Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=[]))
    except Exception as err:  # noqa: BLE001
        if unreachable is not None:
            raise ExmyError(f"{unreachable}, and it is not in the Hub cache") from None
        mapped = hub_error(err, repo_id, revision)
        if mapped is None:
            raise
        raise mapped from None
    from .validate import weight_files

    try:
        weight_files(root)
    except ExmyError as err:
        raise ExmyError(f"{repo_id}: the cached snapshot is incomplete ({err}); "
                        "download it again with network access") from None
    return root
