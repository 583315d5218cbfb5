"""httpx's one-shot calls (``httpx.get``, ``post``, ``request``, ``stream``) as they are, but
sharing one SSL context.

Each one-shot call builds a ``Client``, and each ``Client`` builds an SSL context from
certifi's bundle unless given one: ~50 ms of CPU a call (``httpx.Client()`` 57 ms, with a
context 2 ms), for requests to loopback servers that never use TLS. The suite made ~1,600
such calls, ~90 s of CPU in a py-spy profile, often on the core that the server being
polled needs. Everything else is httpx's own: a new connection per call, no cookie kept.
"""

from __future__ import annotations

import functools

import httpx

_SSL = httpx.create_ssl_context()

get = functools.partial(httpx.get, verify=_SSL)
post = functools.partial(httpx.post, verify=_SSL)
request = functools.partial(httpx.request, verify=_SSL)
stream = functools.partial(httpx.stream, verify=_SSL)
