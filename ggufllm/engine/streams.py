"""How a caller receives a request's chunks: a sync iterator, or an asyncio queue.

The scheduler thread calls a request's sink with a list of chunks per sampled
token (the last list ends with the chunk that carries the finish reason) or
with an exception. Neither side holds a lock while the other runs.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..chunks import Chunk

__all__ = ["ChunkStream", "async_sink", "async_chunks"]


class ChunkStream(Iterator[Chunk]):
    """The chunks of one submitted request, as a plain iterator.

    Leaving a ``for`` loop early does not stop generation by itself (an iterator
    cannot tell); :meth:`close`, a ``with`` block, or dropping the last reference
    to the stream cancels it at the scheduler's next step.

    Args:
        cancel: the request's cancel flag.
        dropped_turns: how many oldest turns the prompt left out to fit the window
            (``overflow="drop_oldest_turns"``); a chat keeps its history in step with it.
    """

    def __init__(self, cancel: threading.Event, *, dropped_turns: int = 0) -> None:
        self.dropped_turns = dropped_turns
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._buffer: deque[Chunk] = deque()
        self._cancel = cancel
        self._done = False
        # a stream dropped unfinished (garbage-collected) cancels its request
        self._finalizer = weakref.finalize(self, cancel.set)
        # the request's sink; it must not reference the stream, or the request
        # would keep an abandoned stream alive
        self.sink = self._queue.put

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> Chunk:
        if not self._buffer:
            if self._done:
                raise StopIteration
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._finish()
                raise item
            self._buffer.extend(item)
        chunk = self._buffer.popleft()
        if chunk.finish_reason is not None:
            self._finish()
        return chunk

    def _finish(self) -> None:
        self._done = True
        self._buffer.clear()
        self._finalizer.detach()

    def close(self) -> None:
        """Cancels the request (it ends with reason ``cancelled``) and ends the iteration."""
        if not self._done:
            self._cancel.set()
            self._finish()

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LoopMailbox:
    """Hands items from the scheduler thread to one event loop with one wake-up per batch.

    The scheduler serves every running request at each step; waking the loop once
    for all of them (not once per request) spares a syscall per token in the
    thread that owns the context.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []

    def put(self, q: asyncio.Queue[Any], item: Any) -> None:
        """Queues ``item`` for ``q``. Raises RuntimeError when the loop is closed."""
        with self._lock:
            self._items.append((q, item))
            if len(self._items) > 1:
                return  # a wake-up is already on its way
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self._lock:
                self._items.clear()  # nobody will drain them
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for q, item in items:
            q.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopMailbox] = \
    weakref.WeakKeyDictionary()


def async_sink(cancel: threading.Event) -> tuple[Any, asyncio.Queue[Any]]:
    """A sink that hands items to the running event loop (no thread per request).

    Returns:
        The sink and the queue it fills.
    """
    loop = asyncio.get_running_loop()
    mailbox = _MAILBOXES.get(loop)
    if mailbox is None:
        mailbox = _MAILBOXES[loop] = _LoopMailbox(loop)
    q: asyncio.Queue[Any] = asyncio.Queue()

    def sink(item: Any) -> None:
        try:
            mailbox.put(q, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            cancel.set()

    return sink, q


async def async_chunks(q: asyncio.Queue[Any], cancel: threading.Event) -> AsyncIterator[Chunk]:
    """Yields the chunks that :func:`async_sink` receives; leaving early cancels."""
    try:
        while True:
            item = await q.get()
            if isinstance(item, BaseException):
                raise item
            for chunk in item:
                yield chunk
                if chunk.finish_reason is not None:
                    return
    finally:
        cancel.set()
