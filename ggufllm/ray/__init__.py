"""ggufllm on Ray Serve: replicas over a cluster, routed so each document's KV cache stays hot.

    pip install 'ggufllm[ray]'
    ggufllm serve --replicas 2                       # a local Ray cluster, 127.0.0.1:8000
    serve run ggufllm.ray:app                        # the model from LLM_MODEL_PATH

Layout (this package imports :mod:`ggufllm.server`, never the reverse)::

    HTTP ─▶ Ray's proxy ─▶ Ingress (.gateway) ── handle, PrefixAffinityRouter (.router) ─▶ LLMReplica × N
                           reads the body, keys it (.keys),                        (.replica): the
                           retries a lost replica                                  server's own app

:mod:`.build` builds the application (:func:`build_app`, sizes from
:class:`ClusterOptions`), :mod:`.launch` runs it for ``ggufllm serve --replicas``.
Its modules but :mod:`.keys` import Ray; the package itself does not (``app`` and the
names below load on first use), and nothing outside it imports Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve import Application

    from .build import ClusterOptions, build_app
    from .router import PrefixAffinityRouter

    app: Application

__all__ = ["app", "build_app", "ClusterOptions", "PrefixAffinityRouter"]

_app: Any = None


def __getattr__(name: str) -> Any:
    # ``serve run ggufllm.ray:app`` reads ``app``: built on first access, from the environment
    global _app
    if name in ("build_app", "ClusterOptions"):
        from . import build

        return getattr(build, name)
    if name == "PrefixAffinityRouter":
        from .router import PrefixAffinityRouter

        return PrefixAffinityRouter
    if name == "app":
        if _app is None:
            from .build import build_app

            _app = build_app()
        return _app
    raise AttributeError(f"module 'ggufllm.ray' has no attribute {name!r}")
