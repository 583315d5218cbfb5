"""The ``ggufllm`` command: thin click commands over the library.

Known failures (every :class:`~ggufllm.errors.GgufllmError`) print one ``error:
...`` line that names the flag the user typed and says the fix, and exit 1; a
mistyped option or value is one ``error: ...`` line too (exit 2); Ctrl-C exits 130.
The answer goes to stdout; reasoning, notices, progress and diagnostics go to stderr
(progress only on a terminal).

Other parts of ggufllm register their commands here with one line each::

    from ..server.cli import serve
    cli.add_command(serve)
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import GgufllmError
from .ask import ask
from .chat import chat
from .common import CliError, explain, verbosity_options
from .convert import convert_cmd, verify_cmd
from .models import info, models
from .output import print_stream

__all__ = ["main", "cli", "print_stream"]


class _Group(click.Group):
    """Translates the error tree in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GgufllmError as exc:
            click.echo(f"error: {explain(exc)}", err=True)
            sys.exit(1)
        except CliError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except click.UsageError as exc:  # a mistyped option or value: one line, not click's three
            where = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message().rstrip('.')}{where}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@verbosity_options
@click.version_option(package_name="ggufllm")
def cli() -> None:
    """Run GGUF models (gpt-oss-20b first) offline through llama.cpp.

    \b
    Examples:
      ggufllm ask "What is the capital of France?"
      ggufllm chat
      ggufllm models
    """


cli.add_command(ask)
cli.add_command(chat)
cli.add_command(models)
cli.add_command(info)
cli.add_command(convert_cmd)
cli.add_command(verify_cmd)

from ..gpu.cli import backend, doctor  # noqa: E402

cli.add_command(doctor)
cli.add_command(backend)

from ..server.cli import bench, serve  # noqa: E402

cli.add_command(serve)
cli.add_command(bench)

convert_command = _Group(commands={"convert": convert_cmd}).commands["convert"]


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="ggufllm")
