"""The app factory."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..service import LLMService
from . import chat, routes
from .config import ServerConfig, load_server_config
from .crosssite import HostOriginMiddleware, JsonOnlyMiddleware
from .errors import install_handlers
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, StatusCountMiddleware
from .state import ServerState, lifespan

__all__ = ["create_app"]


def create_app(service: LLMService | None = None, config: ServerConfig | None = None,
               **settings: Any) -> FastAPI:
    """Builds the ASGI app. Nothing loads here: the model loads in the background once
    the server starts (``/health`` says when it is ready), and is freed at shutdown.

    Args:
        service: the service to serve (the app owns and closes it); None makes one from
            ``settings`` and the environment (``LLM_MODEL_PATH``, ``MAX_LENGTH``...).
        config: server settings; None reads ``GGUFLLM_*`` from the environment.
        **settings: :class:`ggufllm.config.Settings` overrides for the new service
            (``llm_model_path=``, ``n_parallel=``, ``max_queue=``, ``max_length=``).

    Raises:
        ConfigError: a setting is invalid.
    """
    config = config if config is not None else load_server_config()
    if service is None:
        service = LLMService(settings.pop("llm_model_path", None), **settings)
    app = FastAPI(title="ggufllm", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN
    app.state.ggufllm = ServerState(service, config)
    install_handlers(app)
    app.include_router(routes.router)
    app.include_router(chat.router)
    # added last = outermost: count every status; refuse foreign hosts and origins; CORS
    # (preflights pass without the key, allowed pages can read the errors below); the key;
    # JSON only; the size limit
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)
    app.add_middleware(JsonOnlyMiddleware)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Api-Key"])
    app.add_middleware(HostOriginMiddleware, allowed_hosts=config.allowed_hosts,
                       cors_origins=config.cors_origins)
    app.add_middleware(StatusCountMiddleware, metrics=app.state.ggufllm.metrics)
    return app
