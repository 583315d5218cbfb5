"""A streaming parser for gpt-oss (harmony) output, one token at a time.

llama.cpp hands back ``<|channel|>``, ``<|message|>``, ``<|start|>`` as ordinary
tokens, so the wrapper splits the stream into channels itself:

    <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>

Work per token is O(1): a header is buffered up to :data:`MAX_HEADER_BYTES`,
message text goes straight through an incremental UTF-8 decoder. The parser
never raises on model output: an unknown channel, a header that never closes,
a message without ``<|end|>`` all degrade to text on a best-guess channel
(``analysis`` for an unknown channel name, ``final`` for text with no header at
all), and text of the final channel is never dropped.
"""

from __future__ import annotations

import codecs
import enum
import re
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
    """Decoded text on a channel.

    Attributes:
        channel: the message's channel.
        text: its text (may be empty for ``opens``).
        recipient: where the message goes (``functions.NAME`` for a call), None for a message
            to everyone.
        opens: the first delta of a message with a recipient: emitted when its header
            closes, before any text, so that a call is known even with empty arguments.
    """

    channel: Channel
    text: str
    recipient: str | None = None
    opens: bool = False


class _State(enum.Enum):
    HEADER = 1    # between <|start|> and <|message|>
    CONTENT = 2   # inside a message
    IDLE = 3      # after <|end|>, waiting for <|start|>
    DONE = 4      # after <|return|> / <|call|>


# the header parts, in the order the model writes them
_ROLE, _CHANNEL, _CONSTRAINT = 0, 1, 2
_RECIPIENT = re.compile(rb"\s*to=\S+")
_ROLE_WORD = b"assistant"


class HarmonyParser:
    """Splits sampled harmony tokens into channel text.

    Args:
        tokens: the control token ids.
        piece: token id -> its bytes (the detokenizer for one token).

    After :meth:`feed` returns, :attr:`finish_reason` is set once the message
    stream has ended (``stop`` at ``<|return|>``, ``tool_call`` at ``<|call|>``).

    A header is ``[role][ to=recipient]<|channel|>name[ to=recipient][<|constrain|>type]``
    closed by ``<|message|>``. When something else closes it (an ending token,
    ``<|end|>``, a new ``<|start|>``, the length limit) or it grows past
    :data:`MAX_HEADER_BYTES`, what the model wrote there is text, not a header:
    the words after the channel name (or, with no channel, the text after the role
    word) are emitted on that channel, ``final`` when there is none.
    """

    def __init__(self, tokens: HarmonyTokens, piece: Callable[[int], bytes]) -> None:
        self._t = tokens
        self._piece = piece
        # The prompt ends with "<|start|>assistant": output starts inside a header
        # whose role was already written.
        self._state = _State.HEADER
        self._parts = (bytearray(), bytearray(), bytearray())
        self._part = _ROLE
        self._saw_channel = False
        self._explicit_start = False
        self._channel: Channel = "final"
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.finish_reason: FinishReason | None = None
        self.recipient: str | None = None

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    # -- transitions ---------------------------------------------------------

    def _open_header(self, explicit: bool) -> None:
        self._state = _State.HEADER
        for part in self._parts:
            part.clear()
        self._part = _ROLE
        self._saw_channel = False
        self._explicit_start = explicit

    def _open_message(self) -> None:
        words = bytes(self._parts[_CHANNEL]).split()
        self._channel = _channel_of(words[0]) if words else "final"
        header = b" ".join(self._parts).decode("utf-8", "replace")
        self.recipient = next((w[3:] for w in header.split() if w.startswith("to=")), None)
        self._state = _State.CONTENT
        self._decoder.reset()

    def _close_message(self) -> list[Delta]:
        tail = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return [Delta(self._channel, tail, self.recipient)] if tail else []

    def _role_text(self) -> bytes:
        """What the role part holds besides a role word and a recipient."""
        data = bytes(self._parts[_ROLE])
        explicit = self._explicit_start
        if data.lstrip().startswith(_ROLE_WORD):
            rest = data.lstrip()[len(_ROLE_WORD):]
            # After <|start|> the model writes its role; elsewhere the word is a
            # role only when a recipient or nothing follows it.
            if explicit or not _RECIPIENT.sub(b"", rest, count=1).strip():
                data = rest
                explicit = True
        m = _RECIPIENT.match(data)
        if m:
            data = data[m.end():]
        return data.lstrip() if explicit or m else data

    def _header_text(self, overflow: bool = False) -> tuple[Channel, bytes]:
        """A header that is not one: the channel its text belongs to, and the text."""
        if not self._saw_channel:
            return "final", self._role_text() + bytes(self._parts[_CONSTRAINT])
        chan = bytes(self._parts[_CHANNEL]).lstrip()
        words = chan.split(maxsplit=1)
        name = words[0] if words else b""
        channel = _channel_of(name) if name else "final"
        if overflow and name and name not in _CHANNELS_BYTES:
            rest = chan  # an unknown first word may be text already: keep it (as reasoning)
        else:
            rest = words[1] if len(words) > 1 else b""
            m = _RECIPIENT.match(rest)
            rest = rest[m.end():].lstrip() if m else rest
        return channel, rest + bytes(self._parts[_CONSTRAINT])

    def _flush_header(self) -> list[Delta]:
        """Ends a header that no <|message|> closed: its text, if any, on its channel."""
        channel, text = self._header_text()
        for part in self._parts:
            part.clear()
        if not text:
            return []
        self._decoder.reset()
        decoded = self._decoder.decode(text, final=True)
        return [Delta(channel, decoded)] if decoded else []

    def _flush_role(self) -> list[Delta]:
        """Text before <|channel|> / <|message|> that is not a role: answer text."""
        text = self._role_text()
        if not text.strip():
            return []
        self._parts[_ROLE].clear()
        self._decoder.reset()
        decoded = self._decoder.decode(text, final=True)
        return [Delta("final", decoded)] if decoded else []

    # -- feeding -------------------------------------------------------------

    def feed(self, token: int) -> list[Delta]:
        """Consumes one sampled token; returns the text it completes (often none)."""
        t = self._t
        state = self._state
        if state is _State.DONE:
            return []
        if token == t.return_ or token == t.call:
            out = self.finish()
            self.finish_reason = "tool_call" if token == t.call else "stop"
            self._state = _State.DONE
            return out
        if state is _State.CONTENT:
            return self._feed_content(token)
        if token == t.start:
            out = self._flush_header() if state is _State.HEADER else []
            self._open_header(explicit=True)
            return out
        if state is _State.IDLE:
            if token == t.end:
                return []
            self._open_header(explicit=False)  # text or <|channel|> without <|start|>
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
            self._open_header(explicit=token == t.start)
            if token == t.channel:
                self._part = _CHANNEL
                self._saw_channel = True
            return out
        if token in (t.message, t.constrain):
            return []
        text = self._decoder.decode(self._piece(token))
        return [Delta(self._channel, text, self.recipient)] if text else []

    def _feed_header(self, token: int) -> list[Delta]:
        t = self._t
        if token == t.message:
            out = self._flush_role()
            self._open_message()
            if self.recipient is not None:
                out.append(Delta(self._channel, "", self.recipient, opens=True))
            return out
        if token == t.channel:
            out = self._flush_role()
            self._part = _CHANNEL
            self._saw_channel = True
            self._parts[_CHANNEL].clear()
            self._parts[_CONSTRAINT].clear()
            return out
        if token == t.constrain:
            self._part = _CONSTRAINT
            return []
        if token == t.end:
            out = self._flush_header()
            self._state = _State.IDLE
            return out
        self._parts[self._part].extend(self._piece(token))
        if sum(len(p) for p in self._parts) > MAX_HEADER_BYTES:
            return self._header_overflow()
        return []

    def _header_overflow(self) -> list[Delta]:
        """The model is writing text without a <|message|>: the header's text
        starts the message."""
        channel, text = self._header_text(overflow=True)
        self._open_message()
        self._channel = channel
        self.recipient = None  # text, not a header: it addresses nobody
        text = self._decoder.decode(text)
        return [Delta(channel, text)] if text else []

    def finish(self) -> list[Delta]:
        """Flushes at the end of generation (a stream cut by length or a stop)."""
        if self._state is _State.CONTENT:
            out = self._close_message()
            self._state = _State.IDLE
            return out
        if self._state is _State.HEADER:
            out = self._flush_header()
            self._state = _State.IDLE
            return out
        return []


_CHANNELS_BYTES = {name.encode(): channel for name, channel in _CHANNELS.items()}


def _channel_of(name: bytes) -> Channel:
    # An unknown name is reasoning: a misspelt analysis channel must never leak
    # into the answer.
    return _CHANNELS_BYTES.get(name, "analysis")
