"""Readers that turn sampled tokens into chunks: harmony channels, or plain text with stops.

The decode loop feeds every sampled token to one reader; the reader says what
to show and whether generation is over. Both do O(1) work per token.
"""

from __future__ import annotations

import codecs
import secrets
from collections.abc import Sequence
from typing import Protocol

from ..chunks import Chunk, FinishReason, ToolCallDelta
from ..harmony import Delta, HarmonyParser, HarmonyTokens
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
    vocabulary, never at ``<|end|>`` (that only closes a message). A stop string
    ends the answer and drops what follows it; an end-of-generation token ends it
    and keeps everything the parser and the stop window still hold.
    """

    def __init__(self, model: NativeModel, tokens: HarmonyTokens, stops: Sequence[str] = (), *,
                 calls: bool = True) -> None:
        self._model = model
        self._end = tokens.end
        self._parser = HarmonyParser(tokens, model.piece)
        # extra stop strings apply to the answer (final channel) only
        self._stops = StopScanner(stops) if stops else None
        self._ended = False
        # messages to functions.NAME are tool calls (else text on their channel)
        self._calls = calls
        self._n_calls = 0

    def feed(self, token: int) -> tuple[list[Chunk], FinishReason | None]:
        deltas = self._parser.feed(token)
        hit = False
        if self._stops is not None:
            deltas, hit = self._cut_final(deltas)
        chunks = self._chunks(deltas, (token,))
        if hit:
            self._ended = True  # the stop string and whatever follows it are never shown
            return chunks, "stop"
        if self._parser.done:
            return chunks + self._drain(), self._parser.finish_reason or "stop"
        if token != self._end and self._model.is_eog(token):
            return chunks + self._drain(), "stop"
        return chunks, None

    def flush(self, finish: FinishReason) -> list[Chunk]:
        return self._drain()

    def _cut_final(self, deltas: Sequence[Delta]) -> tuple[list[Delta], bool]:
        assert self._stops is not None
        out: list[Delta] = []
        for d in deltas:
            if d.channel != "final":
                out.append(d)
                continue
            text, hit = self._stops.push(d.text)
            if text:
                out.append(Delta("final", text))
            if hit:
                return out, True
        return out, False

    def _drain(self) -> list[Chunk]:
        """Everything still held (parser, stop window), once; nothing after a stop string."""
        if self._ended:
            return []
        self._ended = True
        deltas = self._parser.finish()
        hit = False
        if self._stops is not None:
            deltas, hit = self._cut_final(deltas)
        chunks = [c for c in self._chunks(deltas, ()) if c.text or c.tool_call is not None]
        tail = self._stops.flush() if self._stops is not None and not hit else ""
        return chunks + [Chunk(tail)] if tail else chunks

    def _chunks(self, deltas: Sequence[Delta], ids: tuple[int, ...]) -> list[Chunk]:
        """One chunk per delta, the token ids on the first (or on an empty chunk); a message
        to ``functions.NAME`` becomes tool-call pieces (the call's name when its header
        closes, then its arguments as they come), never text."""
        if not deltas:
            return [Chunk("", "final", ids)]
        out = []
        for i, d in enumerate(deltas):
            own = ids if i == 0 else ()
            call = self._call_piece(d)
            out.append(Chunk(d.text, d.channel, own) if call is None
                       else Chunk("", d.channel, own, tool_call=call))
        return out

    def _call_piece(self, d: Delta) -> ToolCallDelta | None:
        if not (self._calls and d.recipient and d.recipient.startswith(_FUNCTIONS)):
            return None
        if d.opens:
            self._n_calls += 1
            return ToolCallDelta(self._n_calls - 1, f"call_{secrets.token_hex(12)}",
                                 d.recipient[len(_FUNCTIONS):])
        if self._n_calls == 0:
            return None
        return ToolCallDelta(self._n_calls - 1, arguments=d.text)


_FUNCTIONS = "functions."


class TextReader:
    """Plain text on the ``final`` channel, cut at stop strings and end-of-generation tokens.

    A stop string ends the answer before it; an end-of-generation token ends it
    after everything decoded so far, including what the stop window holds back.
    """

    def __init__(self, model: NativeModel, stops: Sequence[str], *,
                 strip_start: bool = True) -> None:
        self._model = model
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = StopScanner(stops)
        self._at_start = strip_start  # a raw continuation keeps its leading space
        self._ended = False

    def feed(self, token: int) -> tuple[list[Chunk], FinishReason | None]:
        if self._model.is_eog(token):
            return [Chunk(self._drain(), "final", (token,))], "stop"
        text = self._decoder.decode(self._model.piece(token))
        if self._at_start:  # an answer does not begin with the prompt's trailing space
            text = text.lstrip()
            self._at_start = not text
        text, hit = self._stops.push(text)
        if hit:
            self._ended = True
            return [Chunk(text, "final", (token,))], "stop"
        return [Chunk(text, "final", (token,))], None

    def flush(self, finish: FinishReason) -> list[Chunk]:
        rest = self._drain()
        return [Chunk(rest)] if rest else []

    def _drain(self) -> str:
        """The decoder's and the stop window's held-back text, once; none after a stop string."""
        if self._ended:
            return ""
        self._ended = True
        rest = self._decoder.decode(b"", final=True)
        if self._at_start:
            rest = rest.lstrip()
        rest, hit = self._stops.push(rest)
        return rest if hit else rest + self._stops.flush()
