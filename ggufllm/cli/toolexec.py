"""Running one call of ``ggufllm ask --tool-exec CMD``: ``CMD NAME`` with no shell, the
arguments' JSON on stdin, the result on stdout; a failure or a timeout is the tool's, told to
the model as ``error: ...`` (see :mod:`ggufllm.cli.tools` for the loop)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from ..chunks import ToolCall
from .common import CliError

__all__ = ["ToolRun", "command_of", "run_tool"]


@dataclass(frozen=True)
class ToolRun:
    """One call and what its command answered.

    Attributes:
        call: the call.
        result: the text the model gets (``error: ...`` when the command failed).
        failure: why the command failed, in the user's words (None: it did not).
        stderr: what the command wrote to stderr.
    """

    call: ToolCall
    result: str
    failure: str | None = None
    stderr: str = ""



def command_of(text: str) -> tuple[str, ...]:
    try:
        argv = shlex.split(text)
    except ValueError as exc:  # an unclosed quotation
        raise CliError(f"--tool-exec {text!r}: {exc}") from None
    if not argv:
        raise CliError("--tool-exec is empty: give the command that runs a call")
    if shutil.which(argv[0]) is None:
        raise CliError(f"--tool-exec: cannot run {argv[0]!r}: no such executable file, nor a "
                       "command on PATH")
    return tuple(argv)


# -- running a call ----------------------------------------------------------------------------

def run_tool(command: Sequence[str], call: ToolCall, timeout_s: float) -> ToolRun:
    """Runs ``command`` with the function's name appended (no shell), the call's arguments
    (JSON) on stdin; its stdout (UTF-8, the trailing newline dropped) is the result.

    A command that exits non-zero, outlives ``timeout_s`` (it is killed, with what it started)
    or writes what is not UTF-8 gives ``error: ...`` as the result: the model is told.

    Raises:
        CliError: the command cannot be started.
    """
    try:
        # a session of its own: a timeout kills what the command started too
        proc = subprocess.Popen([*command, call.name], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as exc:
        raise CliError(f"--tool-exec: cannot run {command[0]!r}: {exc.strerror}") from None
    try:
        out, err = proc.communicate(call.arguments.encode("utf-8"), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, err = proc.communicate()
        return ToolRun(call, f"error: no result within {timeout_s:g} s",
                       f"no result within {timeout_s:g} s (--tool-timeout)", _decoded(err))
    except BaseException:  # Ctrl-C: the command is in its own session, so stop it here
        _kill(proc)
        proc.wait()
        raise
    stderr = _decoded(err)
    if proc.returncode != 0:
        code = proc.returncode
        failure = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return ToolRun(call, f"error: {stderr.strip() or failure}", failure, stderr)
    try:
        return ToolRun(call, out.decode("utf-8").rstrip("\r\n"), None, stderr)
    except UnicodeDecodeError:
        return ToolRun(call, "error: the function's output is not UTF-8 text",
                       "its output is not UTF-8 text", stderr)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # Windows: no process groups
            proc.kill()
    except ProcessLookupError:
        pass


def _decoded(data: bytes) -> str:
    return data.decode("utf-8", "replace")
