"""Cross-site defences: a web page the user visits must not drive the server.

A page can send requests to any address the browser reaches, 127.0.0.1 included. CORS only
keeps it from *reading* answers, and a POST with a "simple" Content-Type (``text/plain``, a
form) is sent without a preflight; with DNS rebinding the page's own name comes to resolve
to 127.0.0.1, and it reads the answers as same-origin. Two middlewares close this, as
Ollama (``OLLAMA_ORIGINS``, its CVE-2024-28224 fix) and Jupyter (its Host check) do:

- :class:`HostOriginMiddleware`, outside CORS:

  - a request that arrives on a loopback address must name a loopback host in ``Host``
    (``localhost``, ``*.localhost``, ``127.x.y.z``, ``[::1]``, any port) or one of
    ``allowed_hosts`` (``--allowed-host``): else 403 ``host_not_allowed``;
  - a request other than GET / HEAD (preflights included) with an ``Origin`` that is neither
    the server's own nor one of ``cors_origins`` (``--cors-origin``): 403
    ``origin_not_allowed``. Clients that are not browsers send no ``Origin``.

- :class:`JsonOnlyMiddleware`, inside CORS (an allowed page can read its 415): POST, PUT and
  PATCH need ``Content-Type: application/json`` (415 ``unsupported_media_type``), which a page
  cannot send cross-site without a preflight.
"""

from __future__ import annotations

import ipaddress
import re

from .errors import APIError
from .middleware import ASGIApp, Receive, Scope, Send, header, send_error

__all__ = ["HostOriginMiddleware", "JsonOnlyMiddleware", "host_name", "is_loopback_name"]

# methods that only read: a foreign page may send them (CORS keeps it from reading the answer)
SAFE_METHODS = frozenset({"GET", "HEAD"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON = "application/json"
_NAME = re.compile(r"[a-z0-9_.-]+|\*")
_HOST = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[^:\[\]]+)(?::(?P<port>[0-9]{0,5}))?")


def host_name(value: str) -> str | None:
    """The lower-case name of a ``Host`` value without its port (IPv6 without brackets),
    or None when it is not a host name, an IP address or ``*``."""
    match = _HOST.fullmatch(value.strip().lower())
    if match is None:
        return None
    name = match["name"]
    if name.startswith("["):
        try:
            return str(ipaddress.IPv6Address(name[1:-1]))
        except ValueError:
            return None
    return name if _NAME.fullmatch(name) else None


def _is_loopback_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def is_loopback_name(name: str) -> bool:
    """``localhost``, a name under ``.localhost`` (RFC 6761), or a loopback IP address."""
    return name == "localhost" or name.endswith(".localhost") or _is_loopback_address(name)


class HostOriginMiddleware:
    """The Host check (on loopback) and the Origin check (on requests that change state).

    Args:
        app: the wrapped app.
        allowed_hosts: names accepted besides the loopback ones (``*``: any).
        cors_origins: origins allowed besides the server's own (``*``: any).
    """

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...] = (),
                 cors_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.allowed_hosts = frozenset(allowed_hosts)
        self.cors_origins = frozenset(cors_origins)

    def _host_refused(self, scope: Scope) -> APIError | None:
        server = scope.get("server")
        if "*" in self.allowed_hosts or not server or not _is_loopback_address(str(server[0])):
            return None  # the check guards loopback: from elsewhere, a rebound name is no threat
        raw = header(scope, b"host")
        if raw is None:
            return None  # no browser sends a request without Host
        value = raw.decode("latin-1")
        name = host_name(value)
        if name is not None and (is_loopback_name(name) or name in self.allowed_hosts):
            return None
        return APIError(403, f"the Host {value!r} is not allowed on a loopback address (a "
                        "defence against DNS rebinding); start the server with --allowed-host "
                        f"{name or 'NAME'} (GGUFLLM_ALLOWED_HOSTS) to allow it",
                        "permission_error", "host_not_allowed")

    def _origin_refused(self, scope: Scope) -> APIError | None:
        raw = header(scope, b"origin")
        if raw is None or scope["method"] in SAFE_METHODS or "*" in self.cors_origins:
            return None
        origin = raw.decode("latin-1").strip().lower()
        host = (header(scope, b"host") or b"").decode("latin-1").strip().lower()
        if origin in self.cors_origins or (host and origin in (f"http://{host}",
                                                               f"https://{host}")):
            return None
        return APIError(403, f"requests from the web page at {origin!r} are not allowed; start "
                        f"the server with --cors-origin {origin} (GGUFLLM_CORS_ORIGINS) to allow "
                        "it", "permission_error", "origin_not_allowed")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = self._host_refused(scope) or self._origin_refused(scope)
            if refused is not None:
                await send_error(send, refused)
                return
        await self.app(scope, receive, send)


class JsonOnlyMiddleware:
    """POST, PUT and PATCH need ``Content-Type: application/json`` (415 otherwise), checked
    before the body is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in BODY_METHODS:
            raw = header(scope, b"content-type")
            value = raw.decode("latin-1") if raw is not None else ""
            if value.split(";", 1)[0].strip().lower() != JSON:
                await send_error(send, APIError(
                    415, f"the request body must be JSON, sent with Content-Type: {JSON} (got "
                    f"{value!r})" if value else f"the request body must be JSON, sent with "
                    f"Content-Type: {JSON}", "invalid_request_error", "unsupported_media_type"))
                return
        await self.app(scope, receive, send)
