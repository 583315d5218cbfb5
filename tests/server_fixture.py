"""A real ggufllm server on a free loopback port, run by uvicorn in a thread of the test process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from ggufllm import LLMService
from ggufllm.resolve import default_model_path
from ggufllm.server import ServerConfig, create_app

from . import http_calls as http


@dataclass
class Running:
    url: str
    app: Any
    service: LLMService

    @property
    def state(self) -> Any:
        return self.app.state.ggufllm

    def model_id(self) -> str:
        return str(self.state.model_id)


def wait_health(url: str, want: int = 200, timeout_s: float = 120.0,
                proc: Any = None) -> httpx.Response:
    """Polls /health until it answers ``want`` (fails early if ``proc`` exits)."""
    deadline = time.monotonic() + timeout_s
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, f"the server exited ({proc.returncode})"
        with contextlib.suppress(httpx.TransportError):
            last = http.get(f"{url}/health", timeout=5)
            if last.status_code == want:
                return last
        time.sleep(0.05)
    raise AssertionError(f"/health never answered {want} (last: {last!r})")


@contextlib.contextmanager
def running_server(service: LLMService | None = None, *, wait: bool = True,
                   config: ServerConfig | None = None, sndbuf: int | None = None,
                   **settings: Any) -> Iterator[Running]:
    """Serves ``service`` (default: the embedded model, ``settings`` as overrides);
    ``sndbuf`` sets the kernel send buffer of its connections (a slow network's)."""
    if service is None:
        settings.setdefault("max_length", 1024)
        service = LLMService(default_model_path(), **settings)
    app = create_app(service, config or ServerConfig(api_key=None))
    # proto=IPPROTO_TCP, as uvicorn's own sockets have it: asyncio sets TCP_NODELAY only on
    # connections of such a socket, and without it every response waits ~40 ms (Nagle's
    # algorithm meets the client's delayed ACK between the header and the body writes)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if sndbuf is not None:  # accepted connections inherit it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        if wait:
            wait_health(url)
        yield Running(url, app, service)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"
