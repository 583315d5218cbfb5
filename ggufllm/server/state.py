"""The app's state: the service, its background load, metrics and the shutdown signal.

The model loads in a background task started by the app's lifespan, so the
server accepts connections (and ``/health`` answers 503) while it loads. On
SIGTERM / Ctrl-C the server drains: new requests get 503 with ``Retry-After``
(``/health`` says ``draining``), running ones finish for up to
``drain_timeout_s``, then the shutdown event ends the rest with the
``shutting_down`` error and uvicorn stops; the lifespan's shutdown closes the
service (the model freed). A second signal skips what is left of the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request

from ..service import LLMService
from .config import ServerConfig
from .errors import RETRY_AFTER_S, APIError, to_api_error
from .metrics import Metrics

__all__ = ["ServerState", "lifespan", "state_of"]

logger = logging.getLogger(__name__)


class ServerState:
    """Everything the routes share.

    Args:
        service: the (not yet loaded) service the server owns and closes.
        config: the server's settings.
    """

    def __init__(self, service: LLMService, config: ServerConfig) -> None:
        self.service = service
        self.config = config
        self.metrics = Metrics(service.get_model_info)
        self.load_error: str | None = None
        self.shutdown = asyncio.Event()
        self.draining = False
        self._active = 0  # generations between Generation() and its close()
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_task: asyncio.Task[None] | None = None
        self.model_id: str = config.model_alias or "ggufllm"
        self._load_task: asyncio.Task[None] | None = None

    # -- loading -------------------------------------------------------------

    async def _load(self) -> None:
        try:
            await self.service.load_model()
        except Exception as exc:
            self.load_error = to_api_error(exc).message
            logger.error("model load failed: %s", exc)
            return
        info = self.service.get_model_info()
        path = info.get("model_path") or ""
        if not self.config.model_alias and path:
            self.model_id = path.rsplit("/", 1)[-1].removesuffix(".gguf")
        logger.info("model %s ready", self.model_id)

    def start_loading(self) -> None:
        self._load_task = asyncio.create_task(self._load(), name="ggufllm-load")

    @property
    def status(self) -> str:
        if self.load_error is not None:
            return "error"
        if self.service.health.state == "failed":  # the engine failed past its reload bound
            return "error"
        return "ok" if self.service.is_loaded else "loading"

    @property
    def error(self) -> str | None:
        """Why :attr:`status` is ``error``."""
        if self.load_error is not None:
            return self.load_error
        if self.service.health.state == "failed":
            return f"the engine failed: {self.service.health.last_failure}"
        return None

    def require_ready(self) -> None:
        """Raises the 503 / 500 a generation route answers before the model is usable."""
        if self.shutdown.is_set() or self.draining:
            raise APIError(503, "the server is shutting down", "unavailable_error",
                           "shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.load_error is not None:
            raise APIError(500, self.load_error, "server_error", "model_load_failed")
        if self.service.health.state == "failed":
            raise APIError(500, str(self.error), "server_error", "engine_failed")
        if not self.service.is_loaded and self.service.health.state == "reloading":
            raise APIError(503, "the model is reloading after an engine failure",
                           "unavailable_error", "engine_failed",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if not self.service.is_loaded:
            raise APIError(503, "Loading model", "unavailable_error", "model_loading",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def check_model(self, name: str | None) -> None:
        """Raises 404 for a model name this server does not serve (None: the default)."""
        if name is not None and name not in (self.model_id, "default"):
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.model_id!r}", "not_found_error", "model_not_found", "model")

    # -- draining and shutdown ----------------------------------------------

    def enter(self) -> None:
        """A generation started (the drain waits for it)."""
        self._active += 1
        self._idle.clear()

    def leave(self) -> None:
        """A generation ended."""
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    def begin_drain(self, stop: Callable[[], None]) -> None:
        """Refuses new requests, lets running ones finish for ``drain_timeout_s``, ends the
        rest, then calls ``stop`` (uvicorn's own exit handler). A second call stops at once."""
        if self.draining or self.shutdown.is_set():
            self.shutdown.set()
            stop()
            return
        self.draining = True
        logger.warning("draining: %d running request(s) may finish for up to %g s; new ones "
                       "get 503 (signal again to stop now)", self._active,
                       self.config.drain_timeout_s)
        self._drain_task = asyncio.create_task(self._drain(stop), name="ggufllm-drain")

    async def _drain(self, stop: Callable[[], None]) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout_s)
        except TimeoutError:
            logger.warning("drain timeout: ending %d request(s) with shutting_down", self._active)
        self.shutdown.set()
        stop()

    async def close(self) -> None:
        self.shutdown.set()
        task = self._load_task
        if task is not None and not task.done():
            self.service.cancel_load()
            with contextlib.suppress(BaseException):
                await task
        await self.service.cleanup()
        logger.info("model freed")


def state_of(request: Request) -> ServerState:
    """The state of the app that serves ``request``."""
    return request.app.state.ggufllm  # type: ignore[no-any-return]


def _chain_exit_signals(on_exit: Callable[[Callable[[], None]], None]) -> Callable[[], None]:
    """Puts ``on_exit`` in front of the handlers uvicorn installed for SIGINT/SIGTERM:
    ``on_exit(stop)`` runs first and calls ``stop`` (uvicorn's handler) when it is done.

    uvicorn stops listening at once on these signals and then waits for open
    responses: this lets the server answer 503 while it drains, and end streams
    that outlive the drain. Returns the undo.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals only reach the main thread (tests run servers in threads)
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        prev = signal.getsignal(sig)
        if not callable(prev):
            continue
        previous[sig] = prev

        def handler(signum: int, frame: Any, prev: Any = prev) -> None:
            on_exit(lambda: prev(signum, frame))

        signal.signal(sig, handler)

    def undo() -> None:
        for sig, prev in previous.items():
            signal.signal(sig, prev)

    return undo


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Starts the background load; on shutdown ends streams and frees the model."""
    state: ServerState = app.state.ggufllm
    loop = asyncio.get_running_loop()
    undo = _chain_exit_signals(lambda stop: loop.call_soon_threadsafe(state.begin_drain, stop))
    state.start_loading()
    try:
        yield
    finally:
        undo()
        await state.close()
