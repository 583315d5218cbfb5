"""``ggufllm ask --tools``: the functions a reply may call, the command that runs them, the loop.

Everything the flags say is read and checked before the model loads (:func:`tool_setup_from`);
running one call is :mod:`ggufllm.cli.toolexec`.
Without ``--tool-exec`` the calls of the reply are printed, one JSON object a line
(:func:`print_calls`), and the command ends. With it, each call runs ``CMD NAME`` (``CMD`` split
as a shell would, but run without one) with the arguments' JSON on stdin, and its stdout goes
back to the model as the function's result, ``Turn("tool", ...)`` after the assistant's turn as
the Python loop of ``docs/tools.md`` does, until a reply calls nothing (:func:`converse`). A
command that fails or runs out of time is the tool's failure, not ggufllm's: the model is told
(``error: ...``, as ``llm`` tells it) and a notice says so. A command that cannot be started, a
reply that still calls after ``--max-tool-rounds``, and a call cut before its arguments end are
errors (exit 1).
"""

from __future__ import annotations

import enum
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..chunks import Answer, Chunk, ToolCall
from ..errors import InvalidParameterError
from ..harmony import Turn
from ..service import LLMService
from ..structured.tools import FunctionTool, ToolChoice, tool_choice_of, tools_of
from .common import CliError, quiet, read_json, state
from .load import call_options
from .output import Streamed
from .progress import PromptSpinner, is_terminal
from .toolexec import ToolRun, command_of, run_tool

__all__ = ["ToolSetup", "ToolRound", "Conversation", "Echo", "tool_options", "tool_setup_from",
           "read_tools", "converse", "print_calls", "DEFAULT_TOOL_TIMEOUT_S",
           "DEFAULT_MAX_TOOL_ROUNDS"]

DEFAULT_TOOL_TIMEOUT_S = 60.0
DEFAULT_MAX_TOOL_ROUNDS = 8
_SHOWN_CHARS = 200  # of a result's first line, on stderr
_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class ToolSetup:
    """What the tool flags of one ``ask`` said, checked.

    Attributes:
        tools: the functions of ``--tools FILE``.
        choice: ``--tool-choice``, for the first reply; once a round of calls has run, the
            next replies choose freely (``auto``), as OpenAI's Agents SDK resets it, so that a
            forced call cannot loop.
        command: ``--tool-exec`` split into arguments; None: print the calls and stop.
        timeout_s: ``--tool-timeout``, for one run of the command.
        max_rounds: ``--max-tool-rounds``: the most replies whose calls are run.
    """

    tools: tuple[FunctionTool, ...]
    choice: ToolChoice = "auto"
    command: tuple[str, ...] | None = None
    timeout_s: float = DEFAULT_TOOL_TIMEOUT_S
    max_rounds: int = DEFAULT_MAX_TOOL_ROUNDS


@dataclass(frozen=True)
class ToolRound:
    """One reply that called functions: its reasoning and the runs of its calls."""

    reasoning: str
    runs: tuple[ToolRun, ...]


@dataclass(frozen=True)
class Conversation:
    """A tool conversation that ended: the last reply and the rounds of calls run before it."""

    answer: Answer
    rounds: tuple[ToolRound, ...]

    def record(self) -> dict[str, Any]:
        """What ``--json`` adds to the answer's object: the last reply's calls
        (``tool_calls``) and every round run by ``--tool-exec`` (``tool_rounds``)."""
        return {
            "tool_calls": [_call_record(c) for c in self.answer.tool_calls],
            "tool_rounds": [{"reasoning": r.reasoning, "calls": [
                {**_call_record(run.call), "result": run.result, "failed": run.failure is not None}
                for run in r.runs]} for r in self.rounds],
        }


class Echo(enum.Enum):
    """How a reply's text reaches the terminal."""

    LIVE = "live"  # as it is generated
    WHOLE = "whole"  # once the reply is complete (--no-stream)
    OFF = "off"  # not at all (--json prints it)


# -- the flags -------------------------------------------------------------------------------

def tool_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--tools``, ``--tool-choice``, ``--tool-exec``, ``--tool-timeout``, ``--max-tool-rounds``."""
    options = [
        click.option("--tools", "tools_file", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, metavar="FILE",
                     help="Functions the model may call (gpt-oss): a JSON array of OpenAI tool "
                          "definitions. Without --tool-exec, the calls are printed as JSON lines."),
        click.option("--tool-choice", default=None, metavar="auto|none|required|NAME",
                     help="Whether the reply may call a function, calls none, must call one, "
                          "or must call NAME; after a round of --tool-exec the next replies "
                          "choose freely [default: auto]."),
        click.option("--tool-exec", default=None, metavar="CMD",
                     help="Run each call as CMD NAME (no shell), the arguments' JSON on stdin; "
                          "its stdout goes back to the model, until a reply calls nothing."),
        click.option("--tool-timeout", type=float, default=None, metavar="SECONDS",
                     help="Most seconds one run of --tool-exec may take; past it the model is "
                          f"told the call failed [default: {DEFAULT_TOOL_TIMEOUT_S:g}]."),
        click.option("--max-tool-rounds", type=click.IntRange(min=1), default=None, metavar="N",
                     help="Most replies whose calls --tool-exec runs; a reply that still calls "
                          f"after them is an error [default: {DEFAULT_MAX_TOOL_ROUNDS}]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def tool_setup_from(kw: dict[str, Any], *, overflow: str | None,
                    has_context: bool) -> ToolSetup | None:
    """Pops the tool flags out of ``ask``'s keyword arguments and checks them (before the
    model loads: the file, its schemas, the choice, the command).

    Returns:
        The setup, or None without ``--tools``.

    Raises:
        CliError: a flag without the one it needs, an unusable file, choice or command.
    """
    path: Path | None = kw.pop("tools_file", None)
    choice: str | None = kw.pop("tool_choice", None)
    command: str | None = kw.pop("tool_exec", None)
    timeout_s: float | None = kw.pop("tool_timeout", None)
    max_rounds: int | None = kw.pop("max_tool_rounds", None)
    if path is None:
        _refuse_alone({"--tool-choice": choice, "--tool-exec": command,
                       "--tool-timeout": timeout_s, "--max-tool-rounds": max_rounds}, "--tools FILE")
        return None
    if command is None:
        _refuse_alone({"--tool-timeout": timeout_s, "--max-tool-rounds": max_rounds},
                      "--tool-exec CMD")
    if overflow == "truncate_context" and has_context:
        # the context is in the first user turn of a conversation: nothing can cut it there
        raise CliError("--overflow truncate-context cannot cut the context of a tool "
                       "conversation (--tools); use --overflow shrink-max-tokens, or a shorter "
                       "context")
    if timeout_s is not None and not (math.isfinite(timeout_s) and timeout_s > 0):
        raise CliError(f"--tool-timeout {timeout_s}: give a number of seconds above 0")
    state().in_tools = True
    tools = read_tools(path)
    return ToolSetup(tools, _choice(choice, tools, path),
                     command_of(command) if command is not None else None,
                     DEFAULT_TOOL_TIMEOUT_S if timeout_s is None else timeout_s,
                     max_rounds or DEFAULT_MAX_TOOL_ROUNDS)


def _refuse_alone(given: dict[str, object], needed: str) -> None:
    for flag, value in given.items():
        if value is not None:
            raise CliError(f"{flag} needs {needed}")


def read_tools(path: Path) -> tuple[FunctionTool, ...]:
    """The functions of ``--tools FILE``: a JSON array of OpenAI tool definitions, one
    definition, or ``{"tools": [...]}``; checked (an unsupported schema keyword is named).

    Raises:
        CliError: the file cannot be read, or does not hold usable functions.
    """
    data = read_json(path, "--tools")
    if isinstance(data, dict):
        data = data["tools"] if "tools" in data and not {"function", "name"} & data.keys() \
            else [data]
    shape = '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
    if not isinstance(data, list):
        raise CliError(f"--tools {path} must hold a JSON array of functions ([{shape}, ...])")
    if not data:
        raise CliError(f"--tools {path} holds no functions")
    for i, value in enumerate(data):
        if not isinstance(value, dict):
            raise CliError(f"--tools {path}: tools[{i}] must be a JSON object ({shape})")
    try:
        return tools_of(data)
    except InvalidParameterError as exc:  # an UnsupportedSchemaError names the keyword
        raise CliError(f"--tools {path}: {exc}") from None


def _choice(value: str | None, tools: Sequence[FunctionTool], path: Path) -> ToolChoice:
    names = [t.name for t in tools]
    if value is not None and value not in _CHOICES and value not in names:
        raise CliError(f"--tool-choice {value}: {path} has no function of that name (it offers "
                       f"{', '.join(names)}); use auto, none, required or one of those")
    return tool_choice_of(value, tools)


# -- the conversation --------------------------------------------------------------------------

def converse(service: LLMService, setup: ToolSetup, turns: Sequence[Turn],
             params: dict[str, Any], *, instructions: str | None, echo: Echo,
             show_reasoning: bool, after: Callable[[Streamed], None] | None = None) -> Conversation:
    """Asks until a reply calls nothing: with ``setup.command``, each reply's calls are run and
    their results sent back; without it, the first reply ends the conversation. Each call is
    announced on stderr (unless ``-q``), with the first line of its result.

    Args:
        turns: the conversation so far (ends with the user's turn).
        params: generation parameters (the flags').
        instructions: ``--system``.
        echo: how each reply's text is printed.
        show_reasoning: print the reasoning (stderr).
        after: called after each reply (the notes: cut by the budget, stats).

    Raises:
        CliError: the command cannot be started, a reply still calls after
            ``setup.max_rounds`` rounds, or a call was cut before its arguments ended.
        GgufllmError: the service's (a model without tool calls, a prompt that outgrew the
            window...).
    """
    turns = list(turns)
    rounds: list[ToolRound] = []
    while True:
        # a forced choice holds for the first reply only: the call it forced has run
        choice = setup.choice if not rounds else "auto"
        streamed = _reply(service, setup, turns, choice, params, instructions, echo,
                          show_reasoning)
        answer = streamed.answer
        _check_complete(answer)
        if after is not None:
            after(streamed)
        if not answer.tool_calls or setup.command is None:
            for call in answer.tool_calls:
                _announce(call)
            return Conversation(answer, tuple(rounds))
        if len(rounds) == setup.max_rounds:
            raise CliError(_too_many_rounds(setup, answer.tool_calls[0]))
        runs = tuple(_run(setup.command, call, setup.timeout_s) for call in answer.tool_calls)
        rounds.append(ToolRound(answer.reasoning, runs))
        turns.append(Turn("assistant", answer.text, answer.reasoning, answer.tool_calls))
        turns.extend(Turn("tool", run.result, name=run.call.name) for run in runs)


def _reply(service: LLMService, setup: ToolSetup, turns: Sequence[Turn], choice: ToolChoice,
           params: dict[str, Any], instructions: str | None, echo: Echo,
           show_reasoning: bool) -> Streamed:
    """One reply, printed as ``echo`` says."""
    spinner = PromptSpinner(enabled=is_terminal() and not quiet())
    printer = _Printer(echo, show_reasoning)
    seen: list[Chunk] = []
    ttft: float | None = None
    started = time.perf_counter()
    spinner.start()
    try:
        with closing(service.chat_stream(turns, tools=setup.tools, tool_choice=choice,
                                         **params, **call_options(instructions, spinner))) as chunks:
            for chunk in chunks:
                if not seen:
                    ttft = time.perf_counter() - started
                    spinner.stop()
                seen.append(chunk)
                printer.add(chunk)
    finally:
        spinner.stop()
    answer = Answer.from_chunks(seen)
    printer.end(answer)
    return Streamed(answer, ttft, False)


class _Printer:
    """Prints one reply: its text to stdout, its reasoning (dim) to stderr. Unlike
    :func:`~ggufllm.cli.output.stream_to_terminal`, a reply with no text prints no empty line:
    stdout stays the calls' JSON lines."""

    def __init__(self, echo: Echo, show_reasoning: bool) -> None:
        self.echo = echo
        self.show_reasoning = show_reasoning
        self._text_open = False  # a line of text (stdout) or reasoning (stderr) to end
        self._reasoning_open = False

    def add(self, chunk: Chunk) -> None:
        if self.echo is not Echo.LIVE or not chunk.text:
            return
        if chunk.channel == "final":
            if self._reasoning_open:
                click.echo("", err=True)
                self._reasoning_open = False
            click.echo(chunk.text, nl=False)
            self._text_open = True
        elif self.show_reasoning:
            click.secho(chunk.text, nl=False, err=True, dim=True)
            self._reasoning_open = True

    def end(self, answer: Answer) -> None:
        if self.echo is Echo.WHOLE:
            if self.show_reasoning and answer.reasoning:
                click.secho(answer.reasoning, err=True, dim=True)
            if answer.text:
                click.echo(answer.text)
            return
        if self._reasoning_open:
            click.echo("", err=True)
        if self._text_open:
            click.echo("")


def _check_complete(answer: Answer) -> None:
    """A call whose arguments were cut (the budget or the window ended the reply) is not run."""
    if answer.tool_calls and answer.finish_reason != "tool_call":
        raise CliError(f"the reply ended ({answer.finish_reason}) before its call to "
                       f"{answer.tool_calls[-1].name} was complete; raise --max-tokens")


def _too_many_rounds(setup: ToolSetup, call: ToolCall) -> str:
    n = setup.max_rounds
    return (f"the model still called {call.name} after {n} round{'s' * (n != 1)} of tool "
            f"calls (--max-tool-rounds {n}); raise it")


def _run(command: Sequence[str], call: ToolCall, timeout_s: float) -> ToolRun:
    _announce(call)
    run = run_tool(command, call, timeout_s)
    if not quiet():
        if run.stderr.strip() and run.failure is None:
            click.echo(run.stderr.rstrip("\n"), err=True)
        if run.failure is not None:
            click.echo(f"notice: {call.name} failed ({run.failure}); the model is told: "
                       f"{_first_line(run.result)}", err=True)
        else:
            click.echo(f"  -> {_first_line(run.result)}", err=True)
    return run


def _announce(call: ToolCall) -> None:
    """``tool: get_weather {"city": "Paris"}`` on stderr."""
    if not quiet():
        arguments = _arguments(call)
        shown = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                        ensure_ascii=False)
        click.echo(f"tool: {call.name} {shown}", err=True)


def _first_line(text: str) -> str:
    lines = text.splitlines() or [""]
    line = lines[0]
    more = len(line) > _SHOWN_CHARS or len(lines) > 1
    return line[:_SHOWN_CHARS] + (" …" if more else "")


def _arguments(call: ToolCall) -> Any:
    """The arguments as a JSON value (the grammar makes a complete call's valid JSON; the
    text itself otherwise)."""
    try:
        return call.parsed_arguments()
    except ValueError:
        return call.arguments


def _call_record(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "name": call.name, "arguments": _arguments(call)}


def print_calls(answer: Answer) -> None:
    """The reply's calls on stdout, one JSON object a line: ``{"id", "name", "arguments"}``."""
    for call in answer.tool_calls:
        click.echo(json.dumps(_call_record(call), ensure_ascii=False))
