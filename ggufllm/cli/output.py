"""Printing a stream: the answer to stdout, reasoning and notes to stderr, the stats line."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import click

from ..chunks import Answer, Chunk

__all__ = ["print_stream", "Streamed", "stats_line", "after_answer"]


@dataclass(frozen=True)
class Streamed:
    """What one printed stream gave: the answer fold, the time to the first token,
    and whether the user interrupted it."""

    answer: Answer
    ttft_s: float | None
    interrupted: bool


def print_stream(chunks: Iterable[Chunk], show_reasoning: bool, *,
                 started: float | None = None, on_first: object = None,
                 interrupt: threading.Event | None = None) -> Answer:
    """Streams answer text to stdout (and reasoning to stderr); returns the fold."""
    return stream_to_terminal(chunks, show_reasoning, started=started, on_first=on_first,
                              interrupt=interrupt).answer


def stream_to_terminal(chunks: Iterable[Chunk], show_reasoning: bool, *,
                       started: float | None = None, on_first: object = None,
                       interrupt: threading.Event | None = None) -> Streamed:
    """Prints a stream as it comes.

    Args:
        chunks: the stream (closed here when ``interrupt`` is set).
        show_reasoning: print gpt-oss reasoning (dim, stderr).
        started: when the call began (for the time to first token).
        on_first: called once before the first chunk is printed (stops a spinner).
        interrupt: set (by a Ctrl-C handler) to stop the answer at the next token.
    """
    started = time.perf_counter() if started is None else started
    seen: list[Chunk] = []
    ttft: float | None = None
    in_reasoning = False
    interrupted = False
    iterator: Iterator[Chunk] = iter(chunks)
    try:
        for chunk in iterator:
            if not seen:
                ttft = time.perf_counter() - started
                if callable(on_first):
                    on_first()
            seen.append(chunk)
            if chunk.text:
                if chunk.channel == "final":
                    if in_reasoning:
                        click.echo("", err=True)
                        in_reasoning = False
                    click.echo(chunk.text, nl=False)
                elif show_reasoning:
                    in_reasoning = True
                    click.secho(chunk.text, nl=False, err=True, dim=True)
            if interrupt is not None and interrupt.is_set():
                interrupted = True
                break
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # stops decoding and frees the model at once
        if callable(on_first) and not seen:
            on_first()
    click.echo("")
    return Streamed(Answer.from_chunks(seen), ttft, interrupted)


def stats_line(streamed: Streamed) -> str:
    """``ttft 0.31 s · prompt 52 tokens (40 cached, 12 evaluated) · 9 generated · 31.2 tok/s``."""
    t = streamed.answer.timings
    ttft = f"ttft {streamed.ttft_s:.2f} s · " if streamed.ttft_s is not None else ""
    if t is None:
        return f"{ttft}(no timings: the answer was interrupted)"
    return (f"{ttft}prompt {t.n_prompt} tokens ({t.n_cached} cached, "
            f"{t.n_prompt - t.n_cached} evaluated in {t.prompt_s:.2f} s) · {t.n_generated} "
            f"generated in {t.decode_s:.2f} s · {t.decode_tokens_per_s:.1f} tok/s")


def after_answer(streamed: Streamed, *, max_tokens: int, stats: bool, quiet: bool) -> None:
    """The notes that follow an answer on stderr: cut by the budget, and the stats."""
    if streamed.answer.finish_reason == "length" and not quiet:
        t = streamed.answer.timings
        if t is not None and t.n_generated < max_tokens:  # the window ended it, not the budget
            note = (f"the answer was cut where the context window ends ({t.n_prompt} prompt + "
                    f"{t.n_generated} answer tokens); raise --ctx for more")
        else:
            note = f"the answer was cut at --max-tokens {max_tokens}; raise it for more"
        click.secho(f"note: {note}", err=True, fg="yellow")
    if stats:
        click.secho(stats_line(streamed), err=True, dim=True)
