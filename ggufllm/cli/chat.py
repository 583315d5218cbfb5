"""``ggufllm chat``: an interactive session, a REPL people like.

Ctrl-C during an answer stops that answer (the partial text stays in the history,
marked ``interrupted``) and returns to the prompt; Ctrl-C with text typed drops
that line; Ctrl-D or ``/bye`` exits. Ctrl-C at an empty prompt only says so, as
``ollama run`` does: one meant for an answer that has just ended must not throw the
conversation away. When the conversation outgrows the context window, the oldest
turns are dropped with a one-line notice. Slash commands: see :data:`HELP`.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..chunks import Chunk
from ..config import GenerationConfig
from ..errors import GgufllmError, InvalidParameterError
from ..harmony import Turn
from ..service import LLMService
from .common import explain, flags_from, generation_options, quiet, state, verbose
from .lines import LineReader, interruptible
from .load import call_options, open_service
from .output import Streamed, after_answer, stream_to_terminal
from .progress import PromptSpinner, is_terminal

__all__ = ["chat", "ChatSession"]

HELP = """\
/help               this list
/clear              forget the conversation (keeps /system)
/system TEXT        set the instructions (no TEXT: clear them)
/set NAME VALUE     set a generation parameter, e.g. /set temperature 0.2
                    (NAME: {names}; VALUE 'default' restores it)
/show               model, settings, and tokens used of the context window
/save FILE          write the conversation as JSON
/bye                quit (also Ctrl-D)
\"\"\"              begin and end a message of several lines
Ctrl-C during an answer stops it."""


@dataclass
class Message:
    role: str
    content: str
    interrupted: bool = False

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.interrupted:
            data["interrupted"] = True
        return data


@dataclass
class ChatSession:
    """The state of one chat: the service, the parameters, the instructions, the turns."""

    service: LLMService
    params: dict[str, Any]
    system: str | None = None
    show_reasoning: bool = False
    stats: bool = False
    messages: list[Message] = field(default_factory=list)
    last_used: int | None = None  # tokens of the last prompt + answer

    # -- settings ------------------------------------------------------------

    def config(self) -> GenerationConfig:
        return self.service.generation_config.updated(**self.params)

    def set_param(self, name: str, value: str) -> str:
        """Sets (or with ``default`` unsets) a generation parameter, validated.

        Raises:
            InvalidParameterError: unknown name or invalid value.
        """
        if name not in GenerationConfig.model_fields:
            raise InvalidParameterError(
                f"no parameter {name!r}; one of {', '.join(GenerationConfig.model_fields)}", name)
        params = dict(self.params)
        if value.lower() in ("default", "none", "random") and name != "reasoning_effort":
            params.pop(name, None)
        else:
            params[name] = tuple(shlex.split(value)) if name == "stop" else value
        cfg = self.service.generation_config.updated(**params)  # validates
        params = {k: getattr(cfg, k) for k in params}
        self.params = params
        return f"{name} = {getattr(cfg, name)!r}"

    # -- talking -------------------------------------------------------------

    def _turns(self) -> list[Turn]:
        return [Turn(m.role, m.content) for m in self.messages]

    def _open(self, spinner: PromptSpinner) -> Iterator[Chunk]:
        """Starts the answer; a conversation that outgrew the window loses its oldest turns
        (the service's ``drop_oldest_turns`` policy, which logs the notice), and so does the
        history kept here. A message too long alone loses nothing and raises."""
        extra = call_options(self.system, spinner)
        params = {**self.params, "overflow": "drop_oldest_turns", **extra}
        chunks = self.service.chat_stream(self._turns(), **params)
        first = next(chunks, None)
        del self.messages[:chunks.dropped_turns]
        return _prepend(first, chunks)

    def send(self, text: str) -> Streamed | None:
        """Answers ``text`` (printed as it comes); None when it could not start."""
        self.messages.append(Message("user", text))
        spinner = PromptSpinner(enabled=is_terminal() and not quiet())
        started = time.perf_counter()
        with interruptible() as interrupt:
            spinner.start()
            try:
                chunks = self._open(spinner)
                streamed = stream_to_terminal(chunks, self.show_reasoning, started=started,
                                              on_first=spinner.stop, interrupt=interrupt)
            except GgufllmError as exc:
                spinner.stop()
                self.messages.pop()
                click.echo(f"error: {explain(exc)}", err=True)
                return None
            finally:
                spinner.stop()
        answer = streamed.answer
        self.messages.append(Message("assistant", answer.text, streamed.interrupted))
        if streamed.interrupted:
            click.secho("[interrupted: the partial answer is kept]", err=True, fg="yellow")
        if answer.timings is not None:
            self.last_used = answer.timings.n_prompt + answer.timings.n_generated
        after_answer(streamed, max_tokens=self.config().max_tokens,
                     stats=self.stats or verbose() > 0, quiet=quiet())
        return streamed

    # -- slash commands ------------------------------------------------------

    def command(self, line: str) -> bool:
        """Runs a slash command; False means quit."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("bye", "exit", "quit"):
            return False
        handler = getattr(self, f"_cmd_{name}", None)
        if handler is None:
            click.echo(f"unknown command /{name}; /help lists them", err=True)
            return True
        try:
            handler(arg)
        except GgufllmError as exc:
            click.echo(f"error: {exc}", err=True)
        return True

    def _cmd_help(self, arg: str) -> None:
        click.echo(HELP.format(names=", ".join(GenerationConfig.model_fields)), err=True)

    def _cmd_clear(self, arg: str) -> None:
        self.messages.clear()
        self.last_used = None
        click.echo("(conversation cleared)", err=True)

    def _cmd_system(self, arg: str) -> None:
        self.system = arg or None
        click.echo(f"(instructions {'set' if arg else 'cleared'})", err=True)

    def _cmd_set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name:
            for key, val in self.config().model_dump().items():
                click.echo(f"{key:16} {val!r}", err=True)
            return
        if not value.strip():
            raise InvalidParameterError(f"give a value: /set {name} VALUE", name)
        click.echo(f"({self.set_param(name, value.strip())})", err=True)

    def _cmd_show(self, arg: str) -> None:
        info = self.service.get_model_info()
        used = f"{self.last_used}" if self.last_used is not None else "0"
        lines = [f"model            {info['model_name']} ({info['model_path']})",
                 f"format           {info.get('prompt_format')}, {info.get('quantization')}",
                 f"window           {used} of {info['n_ctx']} tokens used "
                 f"({len(self.messages)} messages)",
                 f"system           {self.system!r}"]
        lines += [f"{k:16} {v!r}" for k, v in self.config().model_dump().items()]
        click.echo("\n".join(lines), err=True)

    def _cmd_save(self, arg: str) -> None:
        if not arg:
            raise InvalidParameterError("give a file: /save FILE", "file")
        info = self.service.get_model_info()
        data = {"model": info["model_path"], "system": self.system,
                "settings": self.config().model_dump(mode="json"),
                "messages": [m.as_json() for m in self.messages]}
        try:
            _write_atomically(Path(arg), json.dumps(data, ensure_ascii=False, indent=2))
        except OSError as exc:
            click.echo(f"error: cannot write {arg}: {exc.strerror or exc}", err=True)
            return
        click.echo(f"(saved {len(self.messages)} messages to {arg})", err=True)


def _write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``: a
    write that fails (a full disk) leaves the old file whole, never truncated. The file is
    mkstemp's 0600: a conversation is its user's own."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _prepend(first: Chunk | None, rest: Iterator[Chunk]) -> Iterator[Chunk]:
    try:
        if first is not None:
            yield first
        yield from rest
    finally:
        close = getattr(rest, "close", None)
        if close is not None:
            close()


@click.command()
@generation_options
def chat(model: str | None, system: str | None, show_reasoning: bool, stats: bool,
         **kw: Any) -> None:
    """An interactive conversation (/help inside lists the commands).

    \b
    Examples:
      ggufllm chat
      ggufllm chat --system "Answer in one sentence." --temperature 0.2
    """
    flags = flags_from(kw)
    state().in_chat = True
    service, _ = open_service(model, flags)
    with service:
        session = ChatSession(service, dict(flags.params), system, show_reasoning, stats)
        info = service.get_model_info()
        if not quiet():
            click.echo(f"{info['model_name']} ({info['model_path']}), {info['n_ctx']}-token "
                       "window. /help for commands, Ctrl-D to quit.", err=True)
        reader = LineReader()
        # outside an answer and the prompt, a Ctrl-C (most likely meant for the answer that
        # has just ended) is dropped; a second one in a row quits
        with interruptible() as stray:
            while True:
                stray.clear()
                text = reader.message()
                if text is None:
                    return
                if not text.strip():
                    continue
                if text.startswith("/"):
                    if not session.command(text.strip()):
                        return
                    continue
                session.send(text)
