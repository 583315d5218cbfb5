"""The HTTP ingress: reads each request, keys it, and hands it to a replica.

Ray's HTTP proxy chooses a replica before the request's body is read, so a
router there cannot see the prompt. The ingress is a small deployment between
the two: it reads the body, computes the affinity key (:mod:`.keys`), and calls
a replica through a handle whose router (:mod:`.router`) uses that key. The
replica runs the server's own app, so every route, error and header is the
one ``ggufllm serve`` gives; the ingress forwards bytes and adds nothing but:

- retries: a replica that dies (its process killed, its node lost) before a
  response's body started is replaced by another (generation is idempotent), up
  to ``attempts`` times; a stream that already sent events ends with an error
  event and ``data: [DONE]``, never a hang;
- ``GET /health``: the replica's answer plus the replicas Ray runs, starts and
  restarts (``"replicas": {"running": 2, ...}``) and the requests this ingress
  sent again after losing a replica (``"retried"``); 503 while none runs;
- Ray's own queue limit (``max_queued_requests``) answers 429 as a full replica
  queue does.
"""

# no `from __future__ import annotations`: FastAPI reads the route methods' annotations
# (Request) as objects, and Ray's ingress wrapper copies the methods where strings do not resolve
import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from ..server.errors import APIError, error_body
from .keys import prefix_keys
from .replica import Head

__all__ = ["Gateway", "portable_scope"]

logger = logging.getLogger(__name__)

_ingress = FastAPI(title="ggufllm", docs_url=None, redoc_url=None, openapi_url=None)
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
# what an ASGI app reads from a scope; the rest (Ray's and FastAPI's objects) stays here
_SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path",
               "query_string", "headers", "client", "server")
_LOST = (RayActorError, DeploymentUnavailableError)
DONE = b"data: [DONE]\n\n"
HEALTH_TIMEOUT_S = 5.0


def portable_scope(scope: dict[str, Any]) -> dict[str, Any]:
    """The parts of an HTTP scope another process's app needs (picklable)."""
    out = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
    out["asgi"] = {"version": "3.0", "spec_version": "2.3"}
    # the app is mounted at "/" in the replica: the application's route prefix comes off
    root = scope.get("root_path", "")
    if root and out.get("path", "").startswith(root):
        out["path"] = out["path"][len(root):] or "/"
        raw = out.get("raw_path")
        if raw is not None and raw.startswith(root.encode()):
            out["raw_path"] = raw[len(root.encode()):] or b"/"
    out["root_path"] = ""
    out["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    return out


def _error(status: int, message: str, type_: str, code: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(error_body(APIError(status, message, type_, code)), status_code=status,
                        headers=headers)


def _lost_event() -> bytes:
    err = APIError(503, "the replica serving this stream stopped; send the request again",
                   "unavailable_error", "replica_lost")
    return b"data: " + json.dumps(error_body(err)).encode() + b"\n\n" + DONE


class _Started:
    """A replica's response whose head (and first body part, if any) arrived."""

    def __init__(self, head: Head, first: bytes | None, rest: DeploymentResponseGenerator) -> None:
        self.head, self.first, self.rest = head, first, rest

    @property
    def streamed(self) -> bool:
        return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                   for k, v in self.head.headers)


@serve.ingress(_ingress)
class Gateway:
    """The ingress deployment (wrapped by :func:`ggufllm.ray.build_app`).

    Args:
        replicas: the handle of the :class:`~ggufllm.ray.replica.LLMReplica` deployment.
        replica_deployment: that deployment's name (for ``/health``).
        attempts: replicas tried for one request before its failure is answered.
    """

    def __init__(self, replicas: DeploymentHandle, replica_deployment: str,
                 attempts: int = 3) -> None:
        self._replicas = replicas.options(stream=True)
        self._replica_deployment = replica_deployment
        self._attempts = max(1, attempts)
        self.retries = 0

    # -- forwarding ----------------------------------------------------------

    async def _start(self, scope: dict[str, Any], body: bytes,
                     keys: tuple[bytes, ...]) -> _Started:
        """Sends the request to a replica and waits for its head and first body part;
        a replica lost before then is replaced by another."""
        for attempt in range(1, self._attempts + 1):
            gen: DeploymentResponseGenerator = self._replicas.handle.remote(scope, body,
                                                                           affinity=keys)
            try:
                head = await gen.__anext__()
                assert isinstance(head, Head)
                try:
                    first = await gen.__anext__()
                except StopAsyncIteration:
                    first = None
                return _Started(head, first, gen)
            except _LOST as exc:
                gen.cancel()
                if attempt == self._attempts:
                    raise
                self.retries += 1
                logger.warning("a replica was lost before answering (%s): retrying on another "
                               "(%d/%d)", type(exc).__name__, attempt, self._attempts - 1)
            except BaseException:
                gen.cancel()
                raise
        raise AssertionError("unreachable")

    async def _whole(self, scope: dict[str, Any], body: bytes, keys: tuple[bytes, ...],
                     started: _Started | None = None) -> tuple[Head, bytes]:
        """A non-streamed response, read to its end; a replica lost on the way is replaced
        (the request is sent again: generation has no side effect)."""
        for attempt in range(1, self._attempts + 1):
            if started is None:
                started = await self._start(scope, body, keys)
            parts = [started.first] if started.first else []
            try:
                async for part in started.rest:
                    parts.append(part)
                return started.head, b"".join(parts)
            except _LOST:
                started.rest.cancel()
                if attempt == self._attempts:
                    raise
                self.retries += 1
                logger.warning("a replica was lost mid-answer: sending the request again")
                started = None
            except BaseException:
                started.rest.cancel()
                raise
        raise AssertionError("unreachable")

    @staticmethod
    async def _relay(started: _Started) -> AsyncIterator[bytes]:
        try:
            if started.first:
                yield started.first
            async for part in started.rest:
                yield part
        except _LOST:
            logger.warning("a replica was lost mid-stream: the stream ends with an error event")
            yield _lost_event()
        finally:
            started.rest.cancel()  # the client left: the replica cancels the generation

    @_ingress.get("/health")
    async def health(self, request: Request) -> Response:
        """The replica's health (any one), with the replicas Ray runs and starts."""
        states = await asyncio.to_thread(self._replica_states)
        running = states.get("running", 0)
        if running == 0:
            return JSONResponse({"status": "loading", "replicas": states}, status_code=503,
                                headers={"Retry-After": "1"})
        try:
            head, data = await asyncio.wait_for(
                self._whole(portable_scope(request.scope), b"", ()), HEALTH_TIMEOUT_S)
            answer = json.loads(data)
        except (TimeoutError, *_LOST, ValueError):
            return JSONResponse({"status": "unavailable", "replicas": states}, status_code=503,
                                headers={"Retry-After": "1"})
        return JSONResponse({**answer, "replicas": states, "retried": self.retries},
                            status_code=head.status)

    @_ingress.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, request: Request) -> Response:
        """Every other route: the replica's own answer."""
        body = await request.body()
        scope = portable_scope(request.scope)
        keys = prefix_keys(scope["path"], body) if scope["method"] == "POST" else ()
        try:
            started = await self._start(scope, body, keys)
            if not started.streamed:
                head, data = await self._whole(scope, body, keys, started)
                response = Response(data, status_code=head.status)
                response.raw_headers = head.headers
                return response
        except BackPressureError:
            return _error(429, "busy: every replica is busy and the queue is full; retry later",
                          "rate_limit_error", "server_busy")
        except _LOST:
            return _error(503, "no replica could answer: the replicas were lost; retry",
                          "unavailable_error", "replica_lost")
        response = StreamingResponse(self._relay(started), status_code=started.head.status)
        response.raw_headers = started.head.headers
        return response

    # -- health --------------------------------------------------------------

    def _replica_states(self) -> dict[str, int]:
        """Ray's count of the replica deployment's replicas by state (running, starting...)."""
        app_name = serve.get_replica_context().app_name
        status = serve.status().applications.get(app_name)
        deployment = status.deployments.get(self._replica_deployment) if status else None
        if deployment is None:
            return {}
        return {str(getattr(k, "value", k)).lower(): int(v)
                for k, v in deployment.replica_states.items()}
