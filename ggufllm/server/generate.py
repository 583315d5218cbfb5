"""The life of one generation request: first chunk before headers, then SSE or a fold.

Routes hand :class:`Generation` the service's chunk iterator and a function
that turns chunks into payloads; it keeps the metrics, sends keep-alive
comments while the prompt is evaluated, ends streams on shutdown, and cancels
the generation when the client goes away (the service frees the slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from ..chunks import Chunk, ToolCallFold
from .errors import APIError, error_body, to_api_error
from .state import ServerState, state_of
from .streaming import ChunkPuller, Fold, PromptProgress

__all__ = ["Generation", "sse", "start_generation"]

Render = Callable[[Chunk, Fold], Iterable[dict[str, Any]]]
DONE = b"data: [DONE]\n\n"
logger = logging.getLogger(__name__)


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", "unavailable_error", "shutting_down")


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class Generation:
    """One request's generation.

    Args:
        state: the server state (metrics, shutdown, config).
        chunks: the service's async chunk iterator (not started yet).
        progress: the prompt-progress receiver passed to the service, if any.
    """

    def __init__(self, state: ServerState, chunks: AsyncIterator[Chunk],
                 progress: PromptProgress | None = None) -> None:
        self.state = state
        self.stream = ChunkPuller(chunks)
        self.progress = progress
        self.fold = Fold(report_cached=state.config.report_cached_tokens)
        self.calls = ToolCallFold()  # the function calls the reply made
        self.t0 = time.perf_counter()
        self.ttft_s: float | None = None
        self._closed = False
        # one waiter on the shutdown event for the whole generation, not a task per chunk
        self._shutdown: asyncio.Future[Any] = asyncio.ensure_future(state.shutdown.wait())
        state.metrics.in_flight.inc()
        state.metrics.waiting.inc()
        state.enter()

    # -- pulling -------------------------------------------------------------

    def _seen(self, chunk: Chunk) -> None:
        if self.ttft_s is None and (chunk.token_ids or chunk.finish_reason is not None):
            self.ttft_s = time.perf_counter() - self.t0
            self.state.metrics.ttft.observe(self.ttft_s)
            self.state.metrics.waiting.dec()
        self.fold.add(chunk)
        if chunk.tool_call is not None:
            self.calls.add(chunk.tool_call)
        if chunk.finish_reason is not None:
            self.state.metrics.finished(chunk.timings)

    async def first(self) -> Chunk | None:
        """The first chunk of a stream, or None when the prompt is still being evaluated after
        the grace period (``keepalive_s``). Errors the service raises for this request
        propagate (after closing), before any header is sent."""
        try:
            chunk = await self.stream.next(self.state.config.keepalive_s, self._shutdown)
        except StopAsyncIteration:
            return None
        except BaseException:
            await self.close()
            raise
        if chunk is not None:
            self._seen(chunk)
        return chunk

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._shutdown.cancel()
        try:
            await self.stream.aclose()
        finally:
            self.state.metrics.in_flight.dec()
            if self.ttft_s is None:
                self.state.metrics.waiting.dec()
            self.state.leave()

    # -- non-streamed --------------------------------------------------------

    async def collect(self, request: Request) -> Fold:
        """Folds the whole generation; a client disconnect or shutdown cancels it.

        Raises:
            APIError: 503 when the server shuts down meanwhile; the service's errors.
        """
        watcher = asyncio.ensure_future(_disconnected(request))
        folding = asyncio.ensure_future(self._fold_rest())
        try:
            await asyncio.wait({folding, watcher, self._shutdown},
                               return_when=asyncio.FIRST_COMPLETED)
            if folding.done():
                folding.result()  # the service's errors propagate
            elif self._shutdown.done():
                raise _shutting_down()
            return self.fold  # done, or nobody to answer: generation stops below
        finally:
            watcher.cancel()
            folding.cancel()
            with contextlib.suppress(BaseException):
                await folding
            await self.close()

    async def _fold_rest(self) -> None:
        while not self.stream.done:
            try:
                chunk = await self.stream.next(None)
            except StopAsyncIteration:
                return
            self._seen(chunk)  # type: ignore[arg-type]

    # -- streamed ------------------------------------------------------------

    def response(self, first: Chunk | None, render: Render,
                 epilogue: Callable[[Fold], Iterable[dict[str, Any]]]) -> StreamingResponse:
        """An SSE response: ``render`` turns each chunk into payloads, ``epilogue`` adds the
        closing ones; ``data: [DONE]`` ends it."""
        return _EventStream(self._events(first, render, epilogue), self.close,
                            self.state.config.write_timeout_s)

    async def _events(self, first: Chunk | None, render: Render,
                      epilogue: Callable[[Fold], Iterable[dict[str, Any]]]) -> AsyncIterator[bytes]:
        keepalive = self.state.config.keepalive_s
        try:
            if first is not None:
                for payload in render(first, self.fold):
                    yield sse(payload)
            failure: APIError | None = None
            while not self.stream.done:
                if self.state.shutdown.is_set():
                    failure = _shutting_down()
                    break
                # before the first token: keep-alives while the prompt is evaluated; after
                # it tokens come every step, and shutdown is checked at each
                waiting = self.ttft_s is None
                try:
                    chunk = await (self.stream.next(keepalive, self._shutdown) if waiting
                                   else self.stream.next(None))
                except StopAsyncIteration:
                    break
                except Exception as exc:  # headers are sent: the error becomes an event
                    failure = to_api_error(exc)
                    break
                if chunk is None:
                    yield self._keepalive()
                    continue
                self._seen(chunk)
                for payload in render(chunk, self.fold):
                    yield sse(payload)
            payloads = [error_body(failure)] if failure else epilogue(self.fold)
            for payload in payloads:
                yield sse(payload)
            yield DONE
        finally:
            await self.close()

    def _keepalive(self) -> bytes:
        latest = self.progress.latest if self.progress is not None else ""
        return f": keep-alive{' prompt ' + latest if latest else ''}\n\n".encode()


class _EventStream(StreamingResponse):
    """An SSE response that closes its generation however the response ends (even when the
    client left before the body started, so the generator's own ``finally`` never ran).

    A client that stops reading would block the write once the socket's buffers are
    full and hold its generation (and its queued chunks) forever: a write that waits
    longer than ``write_timeout_s`` drops the response and cancels the generation.
    """

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 write_timeout_s: float) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close
        self._write_timeout_s = write_timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_or_give_up(message: Any) -> None:
            with anyio.fail_after(self._write_timeout_s):
                await send(message)

        try:
            await super().__call__(scope, receive, send_or_give_up)
        except TimeoutError:
            logger.warning("a streaming client took no data for %g s: dropped, its generation "
                           "cancelled", self._write_timeout_s)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def start_generation(request: Request, model: str | None,
                           open_fn: Callable[[PromptProgress], AsyncIterator[Chunk]]) -> Generation:
    """Checks the server can take the request (503 while loading or draining, 404 for another
    model), then opens its generation with a prompt-progress receiver."""
    state = state_of(request)
    state.require_ready()
    state.check_model(model)
    progress = PromptProgress()
    return Generation(state, open_fn(progress), progress)
