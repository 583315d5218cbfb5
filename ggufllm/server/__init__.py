"""ggufllm's HTTP server: OpenAI-compatible routes, the seed's ``/answer``, a page to try it.

    ggufllm serve --model models/llm/gpt-oss-20b-Q8_0.gguf        # 127.0.0.1:8000
    uvicorn ggufllm.server:app                                    # model from LLM_MODEL_PATH

Layout: :mod:`.factory` (the app factory), :mod:`.state` (service, background load,
shutdown), :mod:`.routes` and :mod:`.chat` (routes of a few lines each),
:mod:`.generate` and :mod:`.streaming` (one generation over HTTP: first chunk
before headers, SSE, cancel on disconnect), :mod:`.schemas` (OpenAI's request
bodies), :mod:`.errors` (the one translation to OpenAI's error shape),
:mod:`.middleware` (API key, body limit, status counts), :mod:`.metrics`
(Prometheus), :mod:`.bench` (the load client), :mod:`.cli` (``serve``, ``bench``).
The server only uses the public :class:`~ggufllm.LLMService` API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ServerConfig
from .factory import create_app

if TYPE_CHECKING:
    from fastapi import FastAPI

    app: FastAPI

__all__ = ["create_app", "ServerConfig", "app"]

_app: Any = None


def __getattr__(name: str) -> Any:
    # ``uvicorn ggufllm.server:app``: the app is made on first access (from the environment),
    # so importing the package reads no settings and loads nothing.
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(f"module 'ggufllm.server' has no attribute {name!r}")
