"""ggufllm's HTTP server: OpenAI-compatible routes, the seed's ``/answer``, a page to try it.

    ggufllm serve --model models/llm/gpt-oss-20b-Q8_0.gguf        # 127.0.0.1:8000
    uvicorn ggufllm.server:app                                    # model from LLM_MODEL_PATH

Layout: :mod:`.factory` (the app factory), :mod:`.state` (service, background load,
shutdown), :mod:`.routes` and :mod:`.chat` (routes of a few lines each),
:mod:`.generate` and :mod:`.streaming` (one generation over HTTP: first chunk
before headers, SSE, cancel on disconnect), :mod:`.schemas` (OpenAI's request
bodies), :mod:`.errors` (the one translation to OpenAI's error shape),
:mod:`.middleware` (API key, body limit, status counts), :mod:`.crosssite` (the
Host and Origin checks and JSON-only POSTs that keep web pages out), :mod:`.metrics`
(Prometheus), :mod:`.bench` (the load client), :mod:`.cli` (``serve``, ``bench``).
The server only uses the public :class:`~ggufllm.LLMService` API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .config import ServerConfig
    from .factory import create_app

    app: FastAPI

__all__ = ["create_app", "ServerConfig", "app"]

_app: Any = None


def __getattr__(name: str) -> Any:
    # Lazy: ``ggufllm``'s CLI imports this package for its commands, and must stay quick to start.
    # ``uvicorn ggufllm.server:app`` makes the app on first access, from the environment.
    global _app
    if name == "create_app":
        from .factory import create_app

        return create_app
    if name == "ServerConfig":
        from .config import ServerConfig

        return ServerConfig
    if name == "app":
        if _app is None:
            from .factory import create_app

            _app = create_app()
        return _app
    raise AttributeError(f"module 'ggufllm.server' has no attribute {name!r}")
