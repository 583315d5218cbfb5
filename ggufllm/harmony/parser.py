"""A streaming parser for gpt-oss (harmony) output, one token at a time.

llama.cpp hands back ``<|channel|>``, ``<|message|>``, ``<|start|>`` as ordinary
tokens, so the wrapper splits the stream into channels itself:

    <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>

Work per token is O(1): a header is buffered up to :data:`MAX_HEADER_BYTES`,
message text goes straight through an incremental UTF-8 decoder. The parser
never raises on model output: an unknown channel, a header that never closes,
a message without ``<|end|>`` all degrade to text on a best-guess channel,
and text of the final channel is never dropped.
"""

from __future__ import annotations

import codecs
import enum
from collections.abc import Callable
from dataclasses import dataclass

from ..chunks import Channel, FinishReason

__all__ = ["HarmonyTokens", "HarmonyParser", "Delta", "MAX_HEADER_BYTES"]

# A real header is a role, a recipient and a channel name: a few dozen bytes.
# Past this, the model is writing text without a <|message|> marker.
MAX_HEADER_BYTES = 128
_CHANNELS: dict[str, Channel] = {"final": "final", "analysis": "analysis",
                                 "commentary": "commentary"}


@dataclass(frozen=True, slots=True)
class HarmonyTokens:
    """The ids of the harmony control tokens in a vocabulary."""

    start: int
    end: int
    message: int
    channel: int
    constrain: int
    return_: int
    call: int

    NAMES = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>",
             "<|return|>", "<|call|>")

    @classmethod
    def from_lookup(cls, lookup: Callable[[str], int | None]) -> HarmonyTokens | None:
        """Builds the table with ``lookup(text) -> id``; None if any token is missing."""
        ids = [lookup(name) for name in cls.NAMES]
        if any(i is None for i in ids):
            return None
        return cls(*ids)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Delta:
    """Decoded text on a channel."""

    channel: Channel
    text: str


class _State(enum.Enum):
    HEADER = 1    # between <|start|> and <|message|>
    CONTENT = 2   # inside a message
    IDLE = 3      # after <|end|>, waiting for <|start|>
    DONE = 4      # after <|return|> / <|call|>


class HarmonyParser:
    """Splits sampled harmony tokens into channel text.

    Args:
        tokens: the control token ids.
        piece: token id -> its bytes (the detokenizer for one token).

    After :meth:`feed` returns, :attr:`finish_reason` is set once the message
    stream has ended (``stop`` at ``<|return|>``, ``tool_call`` at ``<|call|>``).
    """

    def __init__(self, tokens: HarmonyTokens, piece: Callable[[int], bytes]) -> None:
        self._t = tokens
        self._piece = piece
        # The prompt ends with "<|start|>assistant": output starts inside a header.
        self._state = _State.HEADER
        self._header = bytearray()
        self._in_channel_name = False
        self._channel_name = bytearray()
        self._channel: Channel = "final"
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.finish_reason: FinishReason | None = None
        self.recipient: str | None = None

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    # -- transitions ---------------------------------------------------------

    def _open_header(self) -> None:
        self._state = _State.HEADER
        self._header.clear()
        self._channel_name.clear()
        self._in_channel_name = False

    def _open_message(self) -> None:
        name = bytes(self._channel_name).decode("utf-8", "replace").split()
        # A header without a channel, or with one we do not know, is answer text:
        # better shown than lost.
        self._channel = _CHANNELS.get(name[0], "final") if name else "final"
        header = bytes(self._header + b" " + self._channel_name).decode("utf-8", "replace")
        self.recipient = next((w[3:] for w in header.split() if w.startswith("to=")), None)
        self._state = _State.CONTENT
        self._decoder.reset()

    def _close_message(self) -> list[Delta]:
        tail = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return [Delta(self._channel, tail)] if tail else []

    # -- feeding -------------------------------------------------------------

    def feed(self, token: int) -> list[Delta]:
        """Consumes one sampled token; returns the text it completes (often none)."""
        t = self._t
        state = self._state
        if state is _State.DONE:
            return []
        if token == t.return_ or token == t.call:
            out = self._close_message() if state is _State.CONTENT else []
            self.finish_reason = "tool_call" if token == t.call else "stop"
            self._state = _State.DONE
            return out
        if state is _State.CONTENT:
            return self._feed_content(token)
        if token == t.start:
            self._open_header()
            return []
        if state is _State.IDLE:
            if token == t.end:
                return []
            self._open_header()  # text or <|channel|> without <|start|>: a header anyway
        return self._feed_header(token)

    def _feed_content(self, token: int) -> list[Delta]:
        t = self._t
        if token == t.end:
            out = self._close_message()
            self._state = _State.IDLE
            return out
        if token == t.start or token == t.channel:
            # A new message began without <|end|>.
            out = self._close_message()
            self._open_header()
            if token == t.channel:
                self._in_channel_name = True
            return out
        if token in (t.message, t.constrain):
            return []
        text = self._decoder.decode(self._piece(token))
        return [Delta(self._channel, text)] if text else []

    def _feed_header(self, token: int) -> list[Delta]:
        t = self._t
        if token == t.message:
            self._open_message()
            return []
        if token == t.channel:
            self._in_channel_name = True
            self._channel_name.clear()
            return []
        if token == t.constrain:
            self._in_channel_name = False
            return []
        if token == t.end:
            # A header closed with no message: nothing was said.
            self._state = _State.IDLE
            return []
        piece = self._piece(token)
        if self._in_channel_name:
            self._channel_name += piece
        else:
            self._header += piece
        if len(self._header) + len(self._channel_name) > MAX_HEADER_BYTES:
            return self._header_overflow()
        return []

    def _header_overflow(self) -> list[Delta]:
        """The model is writing text without a <|message|>: treat what follows the
        channel name as the message."""
        words = bytes(self._channel_name).split(maxsplit=1)
        rest = words[1] if len(words) > 1 else (b"" if words else bytes(self._header))
        self._channel_name = bytearray(words[0] if words else b"")
        self._open_message()
        text = self._decoder.decode(rest)
        return [Delta(self._channel, text)] if text else []

    def finish(self) -> list[Delta]:
        """Flushes at the end of generation (a stream cut by length or a stop)."""
        if self._state is _State.CONTENT:
            out = self._close_message()
            self._state = _State.IDLE
            return out
        return []
