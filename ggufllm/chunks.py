"""Typed values the decode loop yields, and the fold that turns them into an answer."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Chunk", "Timings", "Answer", "FinishReason", "Channel", "ToolCall", "ToolCallDelta",
           "ToolCallFold"]

FinishReason = Literal["stop", "length", "tool_call", "cancelled"]
# harmony channels; models without channels write everything to "final"
Channel = Literal["final", "analysis", "commentary"]


@dataclass(frozen=True, slots=True)
class Timings:
    """Counts and durations of one generation.

    Attributes:
        n_prompt: tokens in the prompt.
        n_cached: prompt tokens reused from the KV cache (not evaluated again).
        n_generated: tokens sampled.
        prompt_s: seconds spent evaluating the prompt.
        decode_s: seconds spent generating.
    """

    n_prompt: int
    n_cached: int
    n_generated: int
    prompt_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        return self.n_generated / self.decode_s if self.decode_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model made.

    Attributes:
        id: the call's id (``call_...``), which the tool's result refers back to.
        name: the function's name.
        arguments: its arguments, JSON text (as OpenAI's ``function.arguments``).
    """

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> object:
        """The arguments as a Python value (``json.loads``)."""
        return json.loads(self.arguments)


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call as it is generated: the first piece of a call names it (``id``
    and ``name`` set, ``arguments`` empty), the next ones add argument text.

    Attributes:
        index: which call of the reply this belongs to (0 for the first).
        id: the call's id (first piece only).
        name: the function's name (first piece only).
        arguments: argument text to append.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One step of a stream.

    Attributes:
        text: decoded text (may be empty, e.g. for a token that ends mid-UTF-8
            sequence or a harmony header token).
        channel: the harmony channel the text belongs to (``final`` for the answer).
        token_ids: the sampled token ids this chunk covers.
        finish_reason: set on the last chunk only.
        timings: set on the last chunk only.
        tool_call: a piece of a function call (its text is never in ``text``).
    """

    text: str
    channel: Channel = "final"
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    timings: Timings | None = None
    tool_call: ToolCallDelta | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """A finished generation: the answer, the reasoning apart, the function calls, and how
    it ended (``tool_call`` when the reply ended with a call)."""

    text: str
    reasoning: str
    finish_reason: FinishReason | None
    timings: Timings | None
    token_ids: tuple[int, ...]
    tool_calls: tuple[ToolCall, ...] = ()

    @classmethod
    def from_chunks(cls, chunks: Iterable[Chunk]) -> Answer:
        """Folds a stream into an answer (the blocking call is exactly this)."""
        final: list[str] = []
        reasoning: list[str] = []
        ids: list[int] = []
        finish: FinishReason | None = None
        timings: Timings | None = None
        calls = ToolCallFold()
        for chunk in chunks:
            (final if chunk.channel == "final" else reasoning).append(chunk.text)
            ids.extend(chunk.token_ids)
            if chunk.tool_call is not None:
                calls.add(chunk.tool_call)
            if chunk.finish_reason is not None:
                finish, timings = chunk.finish_reason, chunk.timings
        return cls("".join(final), "".join(reasoning), finish, timings, tuple(ids),
                   calls.calls())

    def __str__(self) -> str:
        return self.text


class ToolCallFold:
    """Joins :class:`ToolCallDelta` pieces into whole :class:`ToolCall` values."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._names: list[str] = []
        self._args: list[list[str]] = []

    def add(self, delta: ToolCallDelta) -> None:
        if delta.index == len(self._ids):
            self._ids.append(delta.id or "")
            self._names.append(delta.name or "")
            self._args.append([])
        self._args[delta.index].append(delta.arguments)

    def __bool__(self) -> bool:
        return bool(self._ids)

    def calls(self) -> tuple[ToolCall, ...]:
        return tuple(ToolCall(i, n, "".join(a))
                     for i, n, a in zip(self._ids, self._names, self._args, strict=True))
