"""`exmyconv push`, and what `quantize --push-to-hub` prints; the Hub work is :mod:`exmyconv.integrations.hub`."""
from __future__ import annotations

import shlex

import click
from click.core import ParameterSource

from ..errors import ExmyError
from ..integrations import hub
from .output import emit, json_option


def command_line(ctx: click.Context | None = None, leave_out: tuple[str, ...] = ()) -> str:
    """The running command as parsed: its name, then every option given (not defaulted), then arguments;
    ``leave_out``: parameter names not to record."""
    ctx = ctx or click.get_current_context()
    options, arguments = [], []
    for param in ctx.command.params:
        if param.name not in ctx.params or not param.expose_value or param.name in leave_out:
            continue
        if ctx.get_parameter_source(param.name) in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            continue
        value = ctx.params[param.name]
        if isinstance(param, click.Argument):
            arguments += [str(v) for v in value] if param.multiple or param.nargs != 1 else [str(value)]
            continue
        name = max(param.opts, key=len)
        if param.is_flag and param.secondary_opts:
            options.append(name if value else max(param.secondary_opts, key=len))
        elif param.is_flag:
            if value:
                options.append(name)
        elif param.multiple:
            for v in value:
                options += [name, str(v)]
        elif value is not None:
            options += [name, str(value)]
    return shlex.join([*ctx.command_path.split(), *options, *arguments])


def push_converted(out_dir: str, repo_id: str, private: bool, source: str | None, echo: bool = True) -> dict:
    """For `quantize --push-to-hub`: upload OUT_DIR with a card that shows the quantize command (which
    OUT_DIR's config.json records). Returns the repo id, its URL and the uploaded files."""
    try:
        paths = hub.push(out_dir, repo_id, private=private, source=source)
    except ExmyError as err:
        raise ExmyError(f"{err} ({out_dir} was written; upload it later with `exmyconv push {out_dir} "
                        f"{repo_id}`)") from None
    url = hub.repo_url(repo_id)
    if echo:
        click.echo(f"uploaded {len(paths)} files to {url}")
    return {"repo_id": repo_id, "url": url, "files": paths}


@click.command()
@click.argument("out_dir", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing public repo is refused).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded (and the model card); send nothing.")
@click.option("--revision", metavar="BRANCH", help="Upload to this branch (created from main if missing).")
@click.option("--base-model", metavar="REPO_ID", help="The Hub repo OUT_DIR was converted from (card's base_model).")
@click.option("--keep-readme", is_flag=True, help="Upload OUT_DIR/README.md as it is instead of a generated card.")
@json_option
def push(out_dir, repo_id, private, dry_run, revision, base_model, keep_readme, as_json):
    """Upload a converted OUT_DIR to the Hub model repo REPO_ID (created if needed) with a model card.

    The token is huggingface_hub's: HF_TOKEN, or the one `hf auth login` stored. OUT_DIR/README.md (the
    source's card, copied by quantize) is replaced by a generated card that keeps its license and tags.
    """
    if base_model is not None:
        hub.check_repo_id(base_model)
        if "/" not in base_model:
            raise ExmyError(f"--base-model {base_model!r}: expected owner/name")
    if dry_run:
        plan = hub.upload_plan(out_dir, repo_id, private, revision, source=base_model, keep_readme=keep_readme)
        emit({"dry_run": True, **plan}, as_json, lambda _: hub.render_plan(plan))
        return
    hub.quiet_progress_off_terminal()
    paths = hub.push(out_dir, repo_id, private=private, revision=revision, source=base_model,
                     keep_readme=keep_readme)
    url = hub.repo_url(repo_id, revision)
    emit({"dry_run": False, "repo_id": repo_id, "revision": revision, "url": url, "files": paths}, as_json,
         f"uploaded {len(paths)} files to {url}")
