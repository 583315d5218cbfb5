"""Readers that turn sampled tokens into chunks: harmony channels, or plain text with stops.

The decode loop feeds every sampled token to one reader; the reader says what
to show and whether generation is over. Both do O(1) work per token.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Protocol

from ..chunks import Chunk, FinishReason
from ..harmony import HarmonyParser, HarmonyTokens
from .native import NativeModel
from .stops import StopScanner

__all__ = ["OutputReader", "HarmonyReader", "TextReader"]


class OutputReader(Protocol):
    def feed(self, token: int) -> tuple[list[Chunk], FinishReason | None]:
        """The chunks for one sampled token, and a finish reason if it ends generation."""
        ...

    def flush(self, finish: FinishReason) -> list[Chunk]:
        """What is held back when generation ends for ``finish``."""
        ...


class HarmonyReader:
    """gpt-oss output: channels parsed from the token stream.

    Ends at ``<|return|>`` / ``<|call|>`` or another end-of-generation token of the
    vocabulary, never at ``<|end|>`` (that only closes a message).
    """

    def __init__(self, model: NativeModel, tokens: HarmonyTokens) -> None:
        self._model = model
        self._end = tokens.end
        self._parser = HarmonyParser(tokens, model.piece)

    def feed(self, token: int) -> tuple[list[Chunk], FinishReason | None]:
        chunks = _with_token(self._parser.feed(token), token)
        if self._parser.done:
            return chunks, self._parser.finish_reason or "stop"
        if token != self._end and self._model.is_eog(token):
            return chunks, "stop"
        return chunks, None

    def flush(self, finish: FinishReason) -> list[Chunk]:
        return [Chunk(d.text, d.channel) for d in self._parser.finish() if d.text]


class TextReader:
    """Plain text on the ``final`` channel, cut at stop strings and end-of-generation tokens."""

    def __init__(self, model: NativeModel, stops: Sequence[str]) -> None:
        self._model = model
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = StopScanner(stops)
        self._at_start = True

    def feed(self, token: int) -> tuple[list[Chunk], FinishReason | None]:
        if self._model.is_eog(token):
            return [Chunk("", "final", (token,))], "stop"
        text = self._decoder.decode(self._model.piece(token))
        if self._at_start:  # an answer does not begin with the prompt's trailing space
            text = text.lstrip()
            self._at_start = not text
        text, hit = self._stops.push(text)
        return [Chunk(text, "final", (token,))], "stop" if hit else None

    def flush(self, finish: FinishReason) -> list[Chunk]:
        if finish == "stop":
            return []
        rest, _ = self._stops.push(self._decoder.decode(b"", final=True))
        rest += self._stops.flush()
        return [Chunk(rest)] if rest else []


def _with_token(deltas: Sequence, token: int) -> list[Chunk]:
    """One chunk per delta; the token id rides on the first (or on an empty chunk)."""
    if not deltas:
        return [Chunk("", "final", (token,))]
    return [Chunk(d.text, d.channel, (token,) if i == 0 else ()) for i, d in enumerate(deltas)]
