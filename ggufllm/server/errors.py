"""Every failure as OpenAI's error body: ``{"error": {"message", "type", "code", "param"}}``.

One place translates: :func:`error_response` maps ggufllm's error tree (and
request validation) to a status and a body; :func:`install_handlers` registers
it on the app. Known failures never show a traceback; an unexpected one is
logged here and answered with a bare 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    ConfigError,
    ContextLengthExceededError,
    DecodeFailedError,
    EngineError,
    EngineFailedError,
    GgufllmError,
    InvalidParameterError,
    ModelLoadError,
    RequestRejectedError,
    ServerBusyError,
    ServiceClosedError,
)

__all__ = ["APIError", "error_body", "error_response", "install_handlers", "validate"]

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
RETRY_AFTER_S = 1


class APIError(Exception):
    """An HTTP error raised by the server itself (auth, unknown model, loading...)."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type_, code, param)
        self.headers = headers or {}
        self.extra = extra


def error_body(err: APIError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.type, "code": err.code,
                      "param": err.param, **err.extra}}


def to_api_error(exc: BaseException) -> APIError:
    """The status and OpenAI error for any exception (the one translation table)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthExceededError):
        return APIError(400, f"request ({exc.n_prompt} tokens) exceeds the available context "
                        f"size ({exc.n_ctx} tokens) with max_tokens={exc.max_tokens}, try "
                        "increasing it", "exceed_context_size_error", "context_length_exceeded",
                        "messages", n_prompt_tokens=exc.n_prompt, n_ctx=exc.n_ctx)
    if isinstance(exc, InvalidParameterError):
        return APIError(400, str(exc), "invalid_request_error", "invalid_value", exc.name)
    if isinstance(exc, ServerBusyError):
        return APIError(429, str(exc), "rate_limit_error", "server_busy",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, RequestRejectedError):  # a new kind of refusal: still the caller's
        return APIError(400, str(exc), "invalid_request_error", "rejected")
    if isinstance(exc, ServiceClosedError):
        return APIError(503, "the server is shutting down", "unavailable_error", "shutting_down",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineFailedError):  # the model reloads: worth a retry
        return APIError(503, str(exc), "unavailable_error", "engine_failed",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, DecodeFailedError):
        return APIError(500, str(exc), "server_error", "decode_failed")
    if isinstance(exc, EngineError):  # failed while it ran
        return APIError(500, str(exc), "server_error", "engine_error")
    if isinstance(exc, (ModelLoadError, ConfigError)):
        return APIError(500, f"the model could not be loaded: {exc}", "server_error",
                        "model_load_failed")
    if isinstance(exc, GgufllmError):
        return APIError(500, str(exc), "server_error", "internal_error")
    logger.error("unexpected error", exc_info=exc)
    return APIError(500, "internal server error", "server_error", "internal_error")


def error_response(exc: BaseException) -> JSONResponse:
    err = to_api_error(exc)
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", "invalid_request_error",
                        "invalid_json")
    where = ".".join(loc) or "body"
    return APIError(400, f"{where}: {first.get('msg', 'invalid value')}", "invalid_request_error",
                    "invalid_value", where)


def install_handlers(app: FastAPI) -> None:
    """Registers the translation for ggufllm errors, validation, HTTP errors and the rest."""

    async def on_api(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(_validation_error(exc))

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code,
                                                                          "invalid_request_error")
        return error_response(APIError(exc.status_code, str(exc.detail), kind))

    app.add_exception_handler(APIError, on_api)
    app.add_exception_handler(GgufllmError, on_api)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_api)


def reject_constant(name: str) -> float:
    """``json.loads`` hook: ``NaN`` / ``Infinity`` literals are not JSON."""
    raise ValueError(f"{name} is not a valid JSON number")


def _invalid_json(reason: str) -> APIError:
    return APIError(400, f"the request body is not valid JSON: {reason}",
                    "invalid_request_error", "invalid_json")


def parse_json(body: bytes) -> Any:
    """Strict JSON (RFC 8259): UTF-8 text (a BOM is allowed), finite numbers, and strings that
    are Unicode text. Every violation raises :class:`APIError` (400).

    A lone surrogate (``"\\ud800"``) is a valid JSON escape but no character: no tokenizer
    can encode it, so it is refused here, naming where it is.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _invalid_json(f"it is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=reject_constant)
    except RecursionError:
        raise _invalid_json("it is nested too deeply") from None
    except ValueError as exc:
        raise _invalid_json(str(exc)) from None
    if "\\u" in text:  # a lone surrogate can only come from an escape
        where = _lone_surrogate(value)
        if where is not None:
            raise APIError(400, f"{where or 'body'}: a lone surrogate (\\ud800-\\udfff) is not "
                           "Unicode text", "invalid_request_error", "invalid_value",
                           where or None)
    return value


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")  # strict UTF-8 refuses exactly the surrogates
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(value: Any) -> str | None:
    """The dotted path of the first string (or key) in ``value`` that holds a lone
    surrogate, or None. Iterative: ``value`` may be nested as deep as ``json`` allows."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not _is_text(item):
                return path
        elif isinstance(item, dict):
            for key, child in item.items():
                where = f"{path}.{key}" if path else key
                if not _is_text(key):
                    return where.encode("utf-8", "backslashreplace").decode()
                stack.append((where, child))
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}" if path else str(i), child)
                         for i, child in enumerate(item))
    return None


def validate(model: type[M], body: bytes) -> M:
    """Parses and validates a request body; every problem is an :class:`APIError` (400)."""
    data = parse_json(body)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"{where}: {first['msg']}", "invalid_request_error", "invalid_value",
                       where) from None
