"""Settings of the HTTP server (the model and engine settings stay in :mod:`ggufllm.config`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ..errors import ConfigError

__all__ = ["ServerConfig", "load_server_config"]


class ServerConfig(BaseSettings):
    """How the server behaves; read from ``GGUFLLM_*`` environment variables.

    Model, context and engine settings (``LLM_MODEL_PATH``, ``MAX_LENGTH``,
    ``N_PARALLEL``, ``MAX_QUEUE``...) are the service's own
    (:class:`ggufllm.config.Settings`).
    """

    model_config = SettingsConfigDict(env_prefix="GGUFLLM_", extra="ignore", case_sensitive=False)

    api_key: str | None = Field(None, min_length=1, description="required as a Bearer token on "
                                "every route but /health and the page")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="origins allowed to call the API from a browser (comma-separated)")
    max_body_bytes: int = Field(8 << 20, ge=1024, le=1 << 30,
                                description="larger request bodies get 413")
    keepalive_s: float = Field(1.0, gt=0.0, le=60.0, allow_inf_nan=False,
                               description="SSE comment interval while nothing else is sent")
    model_alias: str | None = Field(None, min_length=1, max_length=256,
                                    description="the model id clients use (default: file stem)")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value


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
        raise ConfigError(f"invalid setting: {name}: {err['msg']}", name) from None
