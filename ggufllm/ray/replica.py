"""One replica: the server's own FastAPI app around one :class:`~ggufllm.LLMService`.

The ingress hands each HTTP request over as its ASGI scope and body; the replica
runs the very app ``ggufllm serve`` runs (:func:`ggufllm.server.create_app`: its
routes, API key, limits, errors, metrics) in process, and streams the response
back: first :class:`Head` (status and headers), then the body's bytes as the app
sends them. The app's lifespan runs once for the replica's life: the model is
loaded before the constructor returns (Ray sends a replica requests only then),
and freed in ``__del__`` after Ray's graceful shutdown let running requests end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..errors import ModelLoadError
from ..server.config import ServerConfig
from ..server.factory import create_app
from ..service import LLMService

__all__ = ["Head", "LLMReplica", "call_app"]

logger = logging.getLogger(__name__)

_END = object()
# messages the app may queue ahead of the ingress reading them (then its own write
# timeout applies, as with a slow client)
_QUEUE = 64


@dataclass(frozen=True)
class Head:
    """The response's status line and headers (ASGI's raw header pairs)."""

    status: int
    headers: list[tuple[bytes, bytes]]


async def call_app(app: Any, scope: dict[str, Any], body: bytes) -> AsyncIterator[Head | bytes]:
    """Runs one HTTP request through an ASGI app in this process.

    Yields the :class:`Head`, then each non-empty body part. Closing the iterator
    early is a client disconnect: the app's ``receive`` returns ``http.disconnect``
    (the server then cancels the generation and frees its slot).
    """
    out: asyncio.Queue[Any] = asyncio.Queue(_QUEUE)
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            raise OSError("the client went away")  # what a server's send does then
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(_END)

    task = asyncio.ensure_future(run())
    try:
        while True:
            message = await out.get()
            if message is _END:
                task.result()  # the app's own failure (a bug: the app answers its errors)
                return
            if message["type"] == "http.response.start":
                yield Head(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])
    finally:
        gone.set()
        if not task.done():
            # the app notices the disconnect and closes its generation; then stop it
            while not out.empty():
                out.get_nowait()
            done, _ = await asyncio.wait({task}, timeout=5.0)
            if not done:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


class LLMReplica:
    """A Ray Serve deployment class (wrapped by :func:`ggufllm.ray.build_app`): one
    service, one app.

    Args:
        model: the model path (None: ``settings.llm_model_path``, then the embedded model).
        settings: the service's settings, as :meth:`Settings.model_dump` gives them.
        server: the server's settings, as :meth:`ServerConfig.model_dump` gives them.
    """

    async def __init__(self, model: str | None, settings: dict[str, Any],
                       server: dict[str, Any]) -> None:
        service = LLMService(model, settings=Settings(**settings))
        self.app = create_app(service, ServerConfig(**server))
        self.state = self.app.state.ggufllm
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the background load
        while self.state.status == "loading":
            await asyncio.sleep(0.05)
        if self.state.status == "error":
            error = self.state.error
            await self._close()
            # Ray retries the replica, then reports the deployment failed with this message
            raise ModelLoadError(str(model or settings.get("llm_model_path")), [str(error)])

    async def handle(self, scope: dict[str, Any], body: bytes,
                     affinity: tuple[bytes, ...] = ()) -> AsyncIterator[Head | bytes]:
        """One HTTP request (``affinity`` is the router's, unused here)."""
        async for part in call_app(self.app, scope, body):
            yield part

    def check_health(self) -> None:
        """Ray's health check: an engine that failed past its reload bound restarts the
        replica (a reload in progress is healthy: the engine recovers by itself)."""
        if self.state.status == "error":
            raise RuntimeError(str(self.state.error))

    async def _close(self) -> None:
        lifespan, self._lifespan = self._lifespan, None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)

    async def __del__(self) -> None:
        # Ray calls this after its graceful shutdown (running requests had
        # graceful_shutdown_timeout_s to end); what still streams ends with shutting_down
        await self._close()
