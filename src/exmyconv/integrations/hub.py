"""Hugging Face Hub: push a converted folder with a generated model card.

(A Hub repo as a *source* is :mod:`exmyconv.io.hub`.) Everything goes through huggingface_hub's public
API (``HfApi.create_repo``, ``HfApi.upload_folder``, ``HfApi.model_info``), so its settings apply as usual: ``HF_ENDPOINT``,
``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``. The token is huggingface_hub's too (``HF_TOKEN`` or the
``hf auth login`` token file) unless one is passed explicitly; exmyconv never prints or writes it.

The uploaded README.md is a model card generated from the converted folder. A README.md inside OUT_DIR
is the *source's* card (``quantize`` copies it with the other side files): its front matter (license,
tags, language, datasets, pipeline_tag) is carried into the card, and it is not uploaded itself unless
``keep_readme=True`` (``--keep-readme``), for a card of your own.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .._version import __version__
from ..errors import ExmyError
from ..format.layout import CONFIG_FILE, SEARCH_REPORT
from ..io.hub import check_repo_id, endpoint, hub_error, is_repo_id, resolve_source
from ..io.validate import exmy_config, read_json

CARD_KEYS = ("license", "license_name", "license_link", "language", "datasets", "pipeline_tag")
TAGS = ("exmy", "exmyconv", "quantized")


# --------------------------------------------------------------------------- quantize's Hub options

def quiet_progress_off_terminal() -> None:
    """huggingface_hub draws progress bars even into a pipe or log file; like exmyconv's own, only on a terminal."""
    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def hub_source(model_dir: str, revision: str | None, push_to_hub: str | None, private: bool) -> tuple[str, str | None]:
    """For `quantize`: check the Hub options and resolve a Hub repo id to a local snapshot.

    Returns (local MODEL_DIR, the repo id or None). Runs before the conversion, so that a missing login
    for --push-to-hub fails at once rather than after a long conversion.
    """
    if private and not push_to_hub:
        raise ExmyError("--private needs --push-to-hub REPO_ID")
    if push_to_hub:
        check_repo_id(push_to_hub)
        from huggingface_hub import get_token

        if not get_token():
            raise ExmyError("--push-to-hub: not logged in to the Hub: set HF_TOKEN or run `hf auth login`")
    if push_to_hub or is_repo_id(model_dir):
        quiet_progress_off_terminal()
    if is_repo_id(model_dir):
        return str(resolve_source(model_dir, revision)), model_dir
    if revision:
        raise ExmyError(f"--revision needs a Hub repo id (owner/name) as MODEL_DIR; {model_dir} is a local path")
    return model_dir, None


# --------------------------------------------------------------------------- model card

def _front_matter(path: Path) -> dict:
    """The YAML front matter of a README.md, {} when it has none or it does not parse."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _as_list(value) -> list:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e4 else str(n)


def _format_rows(report: dict) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for row in report["tensor_table"]:
        if row["rel_error"] is None:
            key = f"{row['format']} (unquantized)"
        else:
            key = row["format"] + (" (per channel)" if row["group"] == "channel" else f" (groups of {row['group']})")
        groups.setdefault(key, []).append(row)
    lines = ["| format | tensors | parameters | bits/weight | mean rel. error | worst rel. error |",
             "|---|---:|---:|---:|---:|---:|"]
    order = sorted(groups, key=lambda k: (k.endswith("(unquantized)"), -sum(r["params"] for r in groups[k]), k))
    for key in order:
        rows = groups[key]
        params = sum(r["params"] for r in rows)
        bits = 8 * sum(r["bytes"] for r in rows) / max(params, 1)
        errs = [r["rel_error"] for r in rows if r["rel_error"] is not None]
        mean = f"{sum(errs) / len(errs):.4f}" if errs else "–"
        worst = f"{max(errs):.4f}" if errs else "–"
        lines.append(f"| {key} | {len(rows)} | {_params(params)} | {bits:.3f} | {mean} | {worst} |")
    return lines


def model_card(out_dir, command: str | None, source: str | None, *, repo_id: str | None = None,
               report: dict | None = None) -> str:
    """README.md for a converted folder: YAML front matter and a summary of the formats, size and error.

    ``source``: what was converted. When it is a Hub repo id it becomes ``base_model``; license, tags,
    language, datasets and pipeline_tag come from the source's card front matter (OUT_DIR/README.md, which
    ``quantize`` copies, or SOURCE/README.md for a local source), the license else from config.json.
    ``command``: the command that made the weights, for a checkpoint that does not record it (config.json's
    ``quantization_config.command``, which ``exmyconv quantize`` writes, wins). ``repo_id``: where the card
    will live (for the title and usage).
    """
    import yaml

    from ..check.inspection import inspect_checkpoint

    out = Path(out_dir)
    report = report if report is not None else inspect_checkpoint(str(out))
    source_card = _front_matter(out / "README.md")
    if not source_card and source and not is_repo_id(source) and not source.startswith("@"):
        source_card = _front_matter(Path(source) / "README.md")
    try:
        config = read_json(out / CONFIG_FILE) if (out / CONFIG_FILE).is_file() else {}
    except ExmyError:
        config = {}
    qcfg = exmy_config(config) or {}
    base_model = source if source and is_repo_id(source) else None

    meta: dict = {}
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = "exmyconv"
    for key in CARD_KEYS:
        if source_card.get(key) not in (None, "", []):
            meta[key] = source_card[key]
    if "license" not in meta and isinstance(config.get("license"), str):
        meta["license"] = config["license"]
    link = meta.get("license_link")
    if isinstance(link, str) and base_model and "://" not in link and not (out / link).is_file():
        meta["license_link"] = f"https://huggingface.co/{base_model}/blob/main/{link.lstrip('/')}"
    formats = sorted({r["format"] for r in report["tensor_table"] if r["rel_error"] is not None})
    tags = []
    for tag in [*TAGS, *formats, *_as_list(source_card.get("tags"))]:
        if tag not in tags:
            tags.append(tag)
    meta["tags"] = tags

    title = (repo_id or out.name).split("/")[-1]
    fmt_text = ", ".join(formats) or "no quantized tensors"
    if base_model:
        intro = (f"[{base_model}](https://huggingface.co/{base_model}) with its weight matrices stored as "
                 f"low-bit floating-point numbers ({fmt_text}) by exmyconv.")
    else:
        intro = (f"A checkpoint with its weight matrices stored as low-bit floating-point numbers ({fmt_text}) "
                 "by exmyconv.")
    lines = [f"# {title}", "", intro, "", "## Weights", "", *_format_rows(report), ""]
    if report["bits_per_weight_quantized"] is not None:
        lines.append(f"- effective bits per quantized weight: **{report['bits_per_weight_quantized']:.3f}** "
                     f"(scales included); {report['bits_per_weight_all']:.2f} over all tensors")
        if report.get("bits_per_weight_nominal") is not None:
            lines.append(f"- nominal bits per quantized weight (formats and scales): "
                         f"{report['bits_per_weight_nominal']:.3f}; the rest, "
                         f"{report['bits_breakdown']['padding']:.3f}, is the layout's row padding (formats/SPEC.md "
                         "section 3)")
    lines.append(f"- size: {_size(report['file_bytes'])} in {len(report['files'])} file"
                 f"{'s' if len(report['files']) != 1 else ''}, {_params(report['params'])} parameters "
                 f"({_params(report['quantized_params'])} quantized, {report['quantized_tensors']} of "
                 f"{report['tensors']} tensors)")
    worst = report.get("worst_rel_error")
    if worst:
        lines.append("- relative error ‖W − Ŵ‖/‖W‖ per quantized tensor: "
                     f"mean {report['mean_rel_error']:.4f}, "
                     f"worst {worst['rel_error']:.4f} (`{worst['name']}`)")
    ignore = qcfg.get("ignore") or []
    if ignore:
        lines.append(f"- kept unquantized: {len(ignore)} tensor{'s' if len(ignore) != 1 else ''} with ≥ 2 "
                     "dimensions (`quantization_config.ignore` in config.json), and all 1-D tensors")
    search = report.get("search") or {}
    if "achieved_bits" in search:
        target = (f"a budget of {search['budget_bits']} bits" if search.get("budget_bits") is not None
                  else f"a max. relative error of {search.get('max_error')}")
        lines.append(f"- formats chosen per tensor for {target} (details: {SEARCH_REPORT})")
    made_with = qcfg.get("exmyconv_version") or __version__
    fmt, group = qcfg.get("format"), qcfg.get("group_size")
    if fmt == "auto":
        settings = "a format chosen per tensor (`--format auto`)"
    elif fmt:
        scales = f"one scale per {group} weights of a row" if group else "one scale per output channel"
        settings = f"format {fmt}, {scales}"
    else:
        settings = "settings not recorded in config.json"
    lines += ["", "## How it was made", "",
              f"Converted by exmyconv {made_with} into the exmy checkpoint layout "
              f"{report.get('exmy_version') or qcfg.get('format_version') or '?'} (formats/SPEC.md in exmyconv): "
              f"{settings}; scales are fp16 (bf16 where fp16 would overflow or underflow)."]
    made_by = qcfg.get("command") or command
    if made_by:
        lines += ["", f"The command that made these weights (exmyconv {made_with}):", "", "```bash", made_by, "```"]
    where = repo_id or "path/to/this/folder"
    lines += ["", "## Use", "",
              "With transformers, **`import exmyconv` first** (`pip install exmyconv`): it registers the "
              "`exmy` quantization method. Without it transformers cannot read these weights; this folder's "
              "config.json then makes `from_pretrained` fail with an `attn_implementation` error that says so.", "",
              "```python",
              "import exmyconv  # registers quant_method \"exmy\" with transformers",
              "from transformers import AutoModelForCausalLM",
              f'model = AutoModelForCausalLM.from_pretrained("{where}")',
              "```", "",
              "Or dequantize with exmyconv (any reader of the exmy layout works the same):", "",
              "```python",
              "import exmyconv" + (", huggingface_hub" if repo_id else ""),
              (f'path = huggingface_hub.snapshot_download("{where}")' if repo_id else f'path = "{where}"'),
              "state_dict = exmyconv.load_state_dict(path)   # {name: torch.Tensor}, dequantized",
              "```", ""]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{front}---\n\n" + "\n".join(lines)


# --------------------------------------------------------------------------- push

def upload_list(out_dir, keep_readme: bool = False) -> list[str]:
    """Files of OUT_DIR that are uploaded (POSIX paths): all but hidden ones and, unless kept, README.md."""
    out = Path(out_dir)
    files = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if rel.as_posix() == "README.md" and not keep_readme:
            continue
        files.append(rel.as_posix())
    return files


def _stage(out: Path, files: list[str], card: str | None, stage: Path) -> None:
    """A folder that mirrors the upload: links to OUT_DIR's files (copies where links fail) and the card."""
    for rel in files:
        dest = stage / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = (out / rel).resolve()
        try:
            os.symlink(src, dest)
        except OSError:
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
    if card is not None:
        (stage / "README.md").write_text(card, encoding="utf-8")


def upload_plan(out_dir, repo_id: str, private: bool = False, revision: str | None = None, *,
                command: str | None = None, source: str | None = None, keep_readme: bool = False) -> dict:
    """What :func:`push` would upload, checked as push checks it: ``repo_id``, ``revision``, ``private``,
    ``files`` (``path``, ``bytes``, ``generated``: the model card), ``bytes`` (their total) and ``card``
    (the generated README.md, or None with ``keep_readme``). Sends nothing, needs no login."""
    from ..check.inspection import inspect_checkpoint

    out = Path(out_dir)
    check_repo_id(repo_id)
    if not out.is_dir():
        raise ExmyError(f"{out}: no such directory")
    report = inspect_checkpoint(str(out))
    if report["kind"] != "exmy":
        raise ExmyError(f"{out}: not an exmy checkpoint (convert it with `exmyconv quantize` first)")
    if not report["intact"]:
        raise ExmyError(f"{out}: fails the integrity checks ({report['problems'][0]}); run `exmyconv inspect {out}`")
    has_readme = (out / "README.md").is_file()
    card = None if keep_readme and has_readme else model_card(out, command, source, repo_id=repo_id, report=report)
    files = [{"path": p, "bytes": (out / p).stat().st_size, "generated": False}
             for p in upload_list(out, keep_readme=keep_readme)]
    if card is not None:
        files.append({"path": "README.md", "bytes": len(card.encode()), "generated": True})
    files.sort(key=lambda f: f["path"])
    return {"out_dir": str(out), "repo_id": repo_id, "revision": revision, "private": private, "files": files,
            "bytes": sum(f["bytes"] for f in files), "card": card}


def render_plan(plan: dict) -> str:
    """`push --dry-run`'s text: the files with their sizes, then the card."""
    target = plan["repo_id"] + (f" (branch {plan['revision']})" if plan["revision"] else "")
    lines = [f"dry run: would upload {len(plan['files'])} files ({_size(plan['bytes'])}) to {target}"
             + (", creating it private if missing" if plan["private"] else ", creating it if missing")]
    width = max(len(f["path"]) for f in plan["files"])
    for f in plan["files"]:
        note = "  (generated model card)" if f["generated"] else ""
        lines.append(f"  {f['path']:<{width}}  {_size(f['bytes']):>9}{note}")
    if plan["card"] is not None:
        lines += ["--- README.md ---", plan["card"].rstrip("\n")]
    return "\n".join(lines)


def push(out_dir, repo_id: str, private: bool = False, dry_run: bool = False, token: str | None = None,
         revision: str | None = None, *, command: str | None = None, source: str | None = None,
         keep_readme: bool = False, echo=None) -> list[str]:
    """Upload a converted folder to the Hub model repo ``repo_id`` (created if needed) with a model card.

    Returns the uploaded paths (in the repo). ``dry_run``: print them with their sizes (and the card)
    and send nothing (:func:`upload_plan` gives the same as data). ``revision``: a branch (created from
    main if missing). ``private``: create the repo private; an existing public repo is refused rather
    than silently published to.
    """
    import click

    echo = echo or click.echo
    out = Path(out_dir)
    plan = upload_plan(out, repo_id, private, revision, command=command, source=source, keep_readme=keep_readme)
    card = plan["card"]
    paths = [f["path"] for f in plan["files"]]
    files = [f["path"] for f in plan["files"] if not f["generated"]]
    if dry_run:
        echo(render_plan(plan))
        return paths

    from huggingface_hub import HfApi, get_token

    if token is None and not get_token():
        raise ExmyError("not logged in to the Hub: set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if private:
            info = api.model_info(repo_id)
            if info.private is False:
                raise ExmyError(f"{repo_id}: exists and is public; not uploading with --private "
                                "(make it private on the Hub first, or leave out --private)")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="exmyconv-push-") as tmp:
            _stage(out, files, card, Path(tmp))
            api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, repo_type="model",
                              commit_message=f"Upload {out.name} (exmyconv {__version__})")
    except ExmyError:
        raise
    except Exception as err:  # noqa: BLE001
        mapped = hub_error(err, repo_id, revision, writing=True)
        if mapped is None:
            raise
        raise mapped from None
    return paths


def repo_url(repo_id: str, revision: str | None = None) -> str:
    url = f"{endpoint()}/{repo_id}"
    return f"{url}/tree/{revision}" if revision else url
