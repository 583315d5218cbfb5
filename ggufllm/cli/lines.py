"""Reading the chat's input: lines from a terminal (readline) or a pipe, what Ctrl-C means
while a line is read, an answer runs or neither, and bytes that are not UTF-8."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

__all__ = ["LineReader", "interruptible", "reading"]


@contextmanager
def interruptible() -> Iterator[threading.Event]:
    """Ctrl-C sets the event (the answer stops at the next token); a second one quits."""
    event = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
        yield event
        return
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, old)


@contextmanager
def reading() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt while a line is read (it drops the line)."""
    try:
        old = signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _from_bytes(data: bytes) -> str:
    """A line as UTF-8; bytes that are not UTF-8 become U+FFFD, with a notice."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        click.secho("(the line held bytes that are not UTF-8: each became U+FFFD)", err=True,
                    fg="yellow")
        return data.decode("utf-8", "replace")


def _as_text(text: str) -> str:
    """``text`` with what the locale's decoder could not read (lone surrogates: under a C
    locale Python decodes stdin with ``surrogateescape``) decoded as UTF-8, which is what a
    terminal most likely sent; the tokenizer refuses lone surrogates."""
    if not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    try:
        data = text.encode(sys.stdin.encoding or "utf-8", "surrogateescape")
    except (UnicodeEncodeError, LookupError):
        data = text.encode("utf-8", "replace")
    return _from_bytes(data)


class LineReader:
    """Reads messages: readline on a terminal, plain lines from a pipe; ``\"\"\"`` blocks."""

    def __init__(self) -> None:
        self.interactive = sys.stdin.isatty() and sys.stdout.isatty()
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass

    def line(self, prompt: str) -> str:
        """One line (Ctrl-C raises KeyboardInterrupt); bytes that are not UTF-8 become U+FFFD.

        Raises:
            EOFError: Ctrl-D, or the end of piped input.
        """
        with reading():
            if self.interactive:
                try:
                    return _as_text(input(prompt))
                except UnicodeDecodeError as exc:  # a strict decoder: it holds the line's bytes
                    return _from_bytes(bytes(exc.object))
            click.echo(prompt, nl=False, err=True)
            data = sys.stdin.buffer.readline()  # piped input is UTF-8, as for `ask`
            if not data:
                raise EOFError
            return _from_bytes(data.rstrip(b"\n"))

    def _typed(self) -> bool:
        """Whether the line being edited when Ctrl-C came held any text."""
        if not self.interactive:
            return False
        try:
            import readline
        except ImportError:
            return False
        return bool(readline.get_line_buffer())

    def message(self) -> str | None:
        """The next message ("" for none); None to quit (Ctrl-D)."""
        try:
            first = self.line(">>> ")
        except KeyboardInterrupt:
            typed = self._typed()
            click.echo("", err=True)
            # with text typed, Ctrl-C drops the line (as a shell does); at an empty prompt it
            # says how to quit, as `ollama run` does (it most likely came for an answer that
            # has just ended)
            if not typed:
                click.echo("Use Ctrl-D or /bye to quit.", err=True)
            return ""
        except EOFError:
            click.echo("", err=True)
            return None
        if not first.lstrip().startswith('"""'):
            return first
        text = first.lstrip()[3:]
        if text.rstrip().endswith('"""'):
            return text.rstrip()[:-3]
        lines = [text] if text else []
        try:
            while True:
                more = self.line("... ")
                if more.rstrip().endswith('"""'):
                    lines.append(more.rstrip()[:-3])
                    return "\n".join(lines)
                lines.append(more)
        except KeyboardInterrupt:
            click.echo("\n(message cancelled)", err=True)
            return ""
        except EOFError:
            return "\n".join(lines)
