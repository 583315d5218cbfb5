"""Settings of the HTTP server (the model and engine settings stay in :mod:`ggufllm.config`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..errors import ConfigError
from .crosssite import host_name

__all__ = ["ServerConfig", "load_server_config"]


class ServerConfig(BaseSettings):
    """How the server behaves; read from ``GGUFLLM_*`` environment variables.

    Model, context and engine settings (``LLM_MODEL_PATH``, ``MAX_LENGTH``,
    ``N_PARALLEL``, ``MAX_QUEUE``...) are the service's own
    (:class:`ggufllm.config.Settings`).
    """

    model_config = SettingsConfigDict(env_prefix="GGUFLLM_", extra="ignore", case_sensitive=False)

    api_key: str | None = Field(None, min_length=1, description="required as a Bearer token on "
                                "every route but /health (unset: no key; empty: an error)")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="origins (scheme://host[:port], or *) allowed to call the API from a "
        "browser page (comma-separated)")
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Host names accepted besides the loopback ones when a request arrives "
        "on a loopback address (comma-separated; * accepts any)")
    max_body_bytes: int = Field(8 << 20, ge=1024, le=1 << 30,
                                description="larger request bodies get 413")
    keepalive_s: float = Field(1.0, gt=0.0, le=60.0, allow_inf_nan=False,
                               description="SSE comment interval while nothing else is sent")
    model_alias: str | None = Field(None, min_length=1, max_length=256,
                                    description="the model id clients use (default: file stem)")
    drain_timeout_s: float = Field(30.0, ge=0.0, le=3600.0, allow_inf_nan=False,
                                   description="on SIGTERM, how long running requests may finish "
                                   "before they end with a shutting_down error")
    write_timeout_s: float = Field(30.0, gt=0.0, le=3600.0, allow_inf_nan=False,
                                   description="a streaming client that takes no data for this "
                                   "long is dropped and its generation cancelled")
    report_cached_tokens: bool = Field(True, description="report usage.prompt_tokens_details."
                                       "cached_tokens (off: always 0, when one key serves "
                                       "several users who must not learn of each other's "
                                       "prompts)")

    @field_validator("api_key", mode="before")
    @classmethod
    def _not_blank(cls, value: object) -> object:
        # an empty variable is a mistake (a shell's `export GGUFLLM_API_KEY=$UNSET_NAME`), never
        # a way to turn authentication off: unset it for that
        if isinstance(value, str) and not value.strip():
            raise ValueError("the API key is set but empty; give a key, or unset "
                             "GGUFLLM_API_KEY to serve without one")
        return value

    @field_validator("cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        origins = tuple(o.strip().lower().rstrip("/") for o in value)
        for origin in origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"{origin!r} is not an origin: write it as a browser sends "
                                 "it, e.g. https://app.example or http://localhost:3000")
        return origins

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = []
        for host in value:
            name = host_name(host)
            if name is None:
                raise ValueError(f"{host!r} is not a host name (e.g. box.lan, or * for any)")
            names.append(name)
        return tuple(names)


def load_server_config(**overrides: Any) -> ServerConfig:
    """Reads :class:`ServerConfig` from the environment with ``overrides`` on top.

    Raises:
        ConfigError: a value is invalid (the message names the variable).
    """
    try:
        return ServerConfig(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "GGUFLLM_" + str(err["loc"][0]).upper() if err["loc"] else None
        message = str(err["msg"]).removeprefix("Value error, ")  # pydantic's prefix for ours
        raise ConfigError(f"invalid setting: {name}: {message}", name) from None
