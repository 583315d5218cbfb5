"""ASGI middleware: the API key and the request-size limit, before any route runs."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import APIError, error_body

__all__ = ["ApiKeyMiddleware", "BodyLimitMiddleware", "StatusCountMiddleware", "PUBLIC_PATHS",
           "send_error", "header"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# /health is public as in llama-server; everything else, the page included, needs the key
PUBLIC_PATHS = frozenset({"/health"})
# the page: a browser asks for the key (as a Basic password) and sends it with the page's calls
PAGE_PATH = "/"


async def send_error(send: Send, err: APIError) -> None:
    body = json.dumps(error_body(err)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


class ApiKeyMiddleware:
    """Every path but :data:`PUBLIC_PATHS` needs ``Authorization: Bearer KEY``,
    ``X-Api-Key: KEY`` (as llama-server accepts) or HTTP Basic with KEY as the password
    (any user name: what a browser sends once asked for the page); compared in constant
    time. CORS preflights pass."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        given = header(scope, b"x-api-key")
        auth = header(scope, b"authorization")
        if auth is not None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        elif auth is not None and auth[:6].lower() == b"basic ":
            given = _basic_password(auth[6:].strip())
        return given is not None and hmac.compare_digest(given, self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] in PUBLIC_PATHS
                or scope["method"] == "OPTIONS" or self._authorized(scope)):
            await self.app(scope, receive, send)
            return
        # the page's 401 makes a browser ask for the key; API clients are told to send a bearer
        challenge = 'Basic realm="ggufllm", charset="UTF-8"' if scope["path"] == PAGE_PATH \
            else "Bearer"
        await send_error(send, APIError(
            401, "invalid or missing API key: send Authorization: Bearer KEY",
            "authentication_error", "invalid_api_key",
            headers={"WWW-Authenticate": challenge}))


def _basic_password(token: bytes) -> bytes | None:
    """The password of an HTTP Basic credential (``base64(user:password)``), or None."""
    try:
        decoded = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return None
    _user, colon, password = decoded.partition(b":")
    return password if colon else None


class BodyLimitMiddleware:
    """Answers 413 for a body over ``limit`` bytes (declared or streamed), before any route."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds {self.limit} bytes",
                        "invalid_request_error", "request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await send_error(send, self._too_large())
            return
        # Read the body here (bounded), then replay it to the app.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # http.disconnect: the client left mid-upload; nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await send_error(send, self._too_large())
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()  # after the body: waits for http.disconnect

    return replay


_ROUTES = frozenset({"/", "/health", "/metrics", "/answer", "/v1/models", "/v1/chat/completions",
                     "/v1/completions"})


class StatusCountMiddleware:
    """Counts every HTTP response by route and status (auth failures, 413s and unexpected
    500s included; a client that left before any answer is not counted)."""

    def __init__(self, app: ASGIApp, metrics: Any) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in _ROUTES else "other"

        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            # Starlette's outermost middleware answers an unexpected error with a 500 after
            # the exception has left this one: count that answer here
            if not started:
                self.metrics.requests.labels(route, "500").inc()
            raise
