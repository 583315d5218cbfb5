"""Typed values the decode loop yields, and the fold that turns them into an answer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Chunk", "Timings", "Answer", "FinishReason", "Channel"]

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
class Chunk:
    """One step of a stream.

    Attributes:
        text: decoded text (may be empty, e.g. for a token that ends mid-UTF-8
            sequence or a harmony header token).
        channel: the harmony channel the text belongs to (``final`` for the answer).
        token_ids: the sampled token ids this chunk covers.
        finish_reason: set on the last chunk only.
        timings: set on the last chunk only.
    """

    text: str
    channel: Channel = "final"
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    timings: Timings | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """A finished generation: the answer, the reasoning apart, and how it ended."""

    text: str
    reasoning: str
    finish_reason: FinishReason | None
    timings: Timings | None
    token_ids: tuple[int, ...]

    @classmethod
    def from_chunks(cls, chunks: Iterable[Chunk]) -> Answer:
        """Folds a stream into an answer (the blocking call is exactly this)."""
        final: list[str] = []
        reasoning: list[str] = []
        ids: list[int] = []
        finish: FinishReason | None = None
        timings: Timings | None = None
        for chunk in chunks:
            (final if chunk.channel == "final" else reasoning).append(chunk.text)
            ids.extend(chunk.token_ids)
            if chunk.finish_reason is not None:
                finish, timings = chunk.finish_reason, chunk.timings
        return cls("".join(final), "".join(reasoning), finish, timings, tuple(ids))

    def __str__(self) -> str:
        return self.text
