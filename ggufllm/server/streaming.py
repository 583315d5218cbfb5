"""One generation as the HTTP layer sees it: opened on the service's public API,
pulled chunk by chunk with a timeout (for SSE keep-alives), closed on disconnect.

Errors the service raises for a request (bad parameters, a prompt over the
context, a full queue) come from the first ``__anext__``; a route awaits that
first pull before it sends headers, so they become real HTTP statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..chunks import Chunk, FinishReason, Timings
from ..harmony import Turn
from ..service import LLMService

__all__ = ["ChunkPuller", "Fold", "open_chat", "open_answer", "PromptProgress"]

logger = logging.getLogger(__name__)


class PromptProgress:
    """Receives the engine's prompt-evaluation progress; shown in SSE keep-alive comments.

    It may be called from the engine's thread: it only replaces one string.
    """

    def __init__(self) -> None:
        self.latest: str = ""

    def __call__(self, *args: Any) -> None:
        # the engine calls it with (prompt tokens in the cache, prompt length)
        self.latest = "/".join(f"{a:.3g}" if isinstance(a, float) else str(a) for a in args)


def open_chat(service: LLMService, turns: Sequence[Turn], instructions: str | None,
              progress: PromptProgress | None, params: dict[str, Any]) -> AsyncIterator[Chunk]:
    """``service.achat_stream``. Without ``max_tokens`` in ``params`` the service's default
    budget applies, capped to what the context leaves."""
    kwargs: dict[str, Any] = {"instructions": instructions} if instructions else {}
    if progress is not None:
        kwargs["on_prompt_progress"] = progress
    return service.achat_stream(list(turns), **kwargs, **params)


def open_completion(service: LLMService, text: str, progress: PromptProgress | None,
                    params: dict[str, Any]) -> AsyncIterator[Chunk]:
    """``service.acomplete_stream(text)``: a raw continuation (OpenAI's legacy completions)."""
    kwargs: dict[str, Any] = {"on_prompt_progress": progress} if progress is not None else {}
    return service.acomplete_stream(text, **kwargs, **params)


def open_answer(service: LLMService, question: str, context: str | None,
                progress: PromptProgress | None, params: dict[str, Any]) -> AsyncIterator[Chunk]:
    """``service.astream(question, context)`` with prompt progress reported."""
    kwargs: dict[str, Any] = {"on_prompt_progress": progress} if progress is not None else {}
    return service.astream(question, context, **kwargs, **params)


class ChunkPuller:
    """Pulls chunks from a service generator with timeouts, and closes it on any exit.

    A pull that times out leaves the pending ``__anext__`` running, so a
    keep-alive can be sent and the pull resumed without losing a chunk.
    """

    def __init__(self, chunks: AsyncIterator[Chunk]) -> None:
        self._chunks = chunks
        self._pending: asyncio.Future[Chunk] | None = None
        self.done = False

    async def next(self, timeout: float | None, *wake: asyncio.Event | asyncio.Future[Any]
                   ) -> Chunk | None:
        """The next chunk; None when ``timeout`` passed or a ``wake`` event/future came first.

        Without a timeout or a wake, the chunk is awaited in the caller's task
        (cancelling that task then cancels the generation).

        Raises:
            StopAsyncIteration: the generation has ended.
            Exception: whatever the service raised for this request.
        """
        if timeout is None and not wake and self._pending is None:
            # nothing to race: await the generator in this task (no task per chunk)
            try:
                return await self._chunks.__anext__()
            except StopAsyncIteration:
                self.done = True
                raise
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._chunks.__anext__())
        waiters: set[asyncio.Future[Any]] = {self._pending}
        made = [asyncio.ensure_future(w.wait()) for w in wake if isinstance(w, asyncio.Event)]
        waiters.update(made)
        waiters.update(w for w in wake if isinstance(w, asyncio.Future))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in made:
                waiter.cancel()
        if not self._pending.done():
            return None
        pending, self._pending = self._pending, None
        try:
            return pending.result()
        except StopAsyncIteration:
            self.done = True
            raise

    async def aclose(self) -> None:
        """Cancels the generation (the service frees its slot) and waits until it let go."""
        with anyio.CancelScope(shield=True):
            pending, self._pending = self._pending, None
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            elif pending is not None and not pending.cancelled():
                pending.exception()  # retrieved: no "exception never retrieved" warning
            aclose = getattr(self._chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


@dataclass
class Fold:
    """What the chunks of one generation add up to."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    n_reasoning_tokens: int = 0
    finish_reason: FinishReason | None = None
    timings: Timings | None = None
    report_cached: bool = True  # off: cached_tokens is always 0 (see ServerConfig)

    def add(self, chunk: Chunk) -> None:
        if chunk.tool_call is not None:
            pass  # a call's tokens are its arguments (the routes collect the calls), not reasoning
        elif chunk.channel == "final":
            self.text.append(chunk.text)
        else:
            self.reasoning.append(chunk.text)
            self.n_reasoning_tokens += len(chunk.token_ids)
        if chunk.finish_reason is not None:
            self.finish_reason, self.timings = chunk.finish_reason, chunk.timings

    def usage(self) -> dict[str, Any]:
        t = self.timings
        n_prompt, n_cached, n_gen = (t.n_prompt, t.n_cached, t.n_generated) if t else (0, 0, 0)
        if not self.report_cached:
            n_cached = 0
        return {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                "total_tokens": n_prompt + n_gen,
                "prompt_tokens_details": {"cached_tokens": n_cached},
                "completion_tokens_details": {"reasoning_tokens": self.n_reasoning_tokens}}


def openai_finish(reason: FinishReason | None) -> str:
    """ggufllm's finish reason in OpenAI's words."""
    return {"length": "length", "tool_call": "tool_calls"}.get(reason or "stop", "stop")

