"""Structured answers: JSON that validates against a schema, from any model.

- :class:`ResponseFormat` is what a call asks for (a JSON Schema dict, a pydantic model
  class, or OpenAI's ``response_format`` objects);
- :mod:`.schema` turns the schema into a GBNF grammar (llama-cpp-python's port of llama.cpp's
  json-schema-to-grammar) and refuses what it cannot express;
- :mod:`.plan` builds what the sampler needs for one request: the grammar (wrapped in
  harmony's message structure for gpt-oss) and the reasoning budget that makes the answer
  arrive within ``max_tokens``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidParameterError
from .schema import JSON_OBJECT_SCHEMA, check_schema, max_answer_tokens, schema_to_gbnf

__all__ = ["ResponseFormat", "check_schema", "schema_to_gbnf", "max_answer_tokens"]


class ResponseFormat(BaseModel):
    """A structured answer: JSON that validates against ``json_schema``.

    Build one with :meth:`of`, which takes every form a caller may hand over.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    json_schema: dict[str, Any] = Field(description="the JSON Schema the answer must match")
    name: str = Field("response", max_length=64, description="shown to the model")
    description: str | None = Field(None, description="shown to the model")
    strict: bool = Field(True, description="accepted for OpenAI compatibility; the answer is "
                         "always constrained")

    @classmethod
    def of(cls, value: Any) -> ResponseFormat | None:
        """The format ``value`` describes; None for no format (``None``, ``{"type": "text"}``).

        Args:
            value: a :class:`ResponseFormat`; a pydantic model class; a JSON Schema dict; or
                OpenAI's ``{"type": "json_object"}`` / ``{"type": "json_schema",
                "json_schema": {"name", "schema", "strict", "description"}}``.

        Raises:
            InvalidParameterError: not one of those.
            UnsupportedSchemaError: the schema uses what the grammar cannot express.
        """
        if value is None or isinstance(value, ResponseFormat):
            fmt = value
        elif isinstance(value, type) and issubclass(value, BaseModel):
            fmt = cls(json_schema=value.model_json_schema(), name=value.__name__[:64],
                      description=(value.__doc__ or "").strip()[:512] or None)
        elif isinstance(value, dict):
            fmt = cls._from_dict(value)
        else:
            raise InvalidParameterError("response_format must be a JSON Schema dict, a pydantic "
                                        f"model class or None (got {type(value).__name__})",
                                        "response_format")
        if fmt is not None:
            check_schema(fmt.json_schema)
        return fmt

    @classmethod
    def _from_dict(cls, value: dict[str, Any]) -> ResponseFormat | None:
        kind = value.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls(json_schema=JSON_OBJECT_SCHEMA, name="json_object")
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise InvalidParameterError("response_format.json_schema must be an object with "
                                            "a \"schema\"", "response_format")
            return cls(json_schema=spec.get("schema") or JSON_OBJECT_SCHEMA,
                       name=str(spec.get("name") or "response")[:64],
                       description=spec.get("description"), strict=bool(spec.get("strict", True)))
        return cls(json_schema=value)

    def schema_text(self) -> str:
        """The schema as compact JSON (what the model is shown)."""
        return json.dumps(self.json_schema, ensure_ascii=False, separators=(",", ":"))
