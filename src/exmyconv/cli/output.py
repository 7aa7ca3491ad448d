"""How commands print their result: a text report, or with ``--json`` one JSON object on stdout.

Every command that prints a result takes :func:`json_option` and prints through :func:`emit`; with
``--json``, stdout holds that object alone and anything else a command says (notes, "wrote FILE") goes
to stderr through :func:`note`. Exit statuses do not depend on ``--json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")


def plain(value):
    """``value`` with what json cannot write turned into what it can: numpy scalars and arrays, paths,
    dataclasses, tuples; NaN and infinities become null (JSON has none)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays, torch tensors
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(result) -> str:
    return json.dumps(plain(result), indent=2, allow_nan=False)


def emit(result, as_json: bool, text) -> None:
    """Print ``result``: as one JSON object with ``--json``, else ``text`` (a string, or a callable that
    renders ``result``)."""
    if as_json:
        click.echo(to_json(result))
    else:
        click.echo(text(result) if callable(text) else text)


def note(message: str, as_json: bool) -> None:
    """A line besides the result: stdout normally, stderr under ``--json`` (stdout is the object alone)."""
    click.echo(message, err=as_json)


def plural(n: int, noun: str) -> str:
    """'1 weight', '2 weights', '0 weights'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")
