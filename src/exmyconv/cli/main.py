"""The `exmyconv` command group and the one error policy: one line and an exit status, never a traceback."""
from __future__ import annotations

import os
import signal
import sys

import click

from .._version import __version__
from ..errors import ExmyError, Interrupted
from .bench import bench
from .check import inspect, verify_cmd
from .convert import dequantize, quantize
from .eval import eval_cmd
from .hub import push


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="exmyconv")
def cli():
    """Convert LLM checkpoints to low-bit ExMy floating-point weights."""


for command in (quantize, inspect, verify_cmd, dequantize, push, bench, eval_cmd):
    cli.add_command(command)


def _interrupted(err: BaseException) -> None:
    """Ctrl-C (exit 130), SIGTERM / SIGHUP (128 + the signal number): one line, never a traceback."""
    cause = err if isinstance(err, Interrupted) else err.__cause__
    signum = cause.signum if isinstance(cause, Interrupted) else signal.SIGINT
    how = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    click.echo(f"interrupted{how}", err=True)
    sys.exit(128 + signum)


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="exmyconv", standalone_mode=False)
    except click.exceptions.Abort as err:
        _interrupted(err)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except ExmyError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as err:
        _interrupted(err)
    except OSError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except Exception as err:  # a bug of ours: one line unless asked for more
        if os.environ.get("EXMYCONV_DEBUG"):
            raise
        click.echo(f"internal error: {type(err).__name__}: {err} (EXMYCONV_DEBUG=1 shows the traceback)", err=True)
        sys.exit(3)
    sys.exit(0)
