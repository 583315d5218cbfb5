"""Stop strings over a text stream, in O(1) work per token."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopScanner"]


class StopScanner:
    """Holds back just enough text to see a stop string that spans tokens.

    ``push`` returns the text that is safe to show and whether a stop string was
    hit; the text before the stop is returned, the stop itself never is. The
    held-back tail is at most ``len(longest stop) - 1`` characters, so each call
    scans a window bounded by the new text plus that tail.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._keep = max((len(s) for s in self._stops), default=1) - 1
        self._tail = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buf = self._tail + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._tail = ""
            return buf[: min(hits)], True
        cut = max(0, len(buf) - self._keep)
        self._tail = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        """The held-back text, at the end of the stream."""
        tail, self._tail = self._tail, ""
        return tail
