"""Function tools a reply may call, and which of them it must call.

- :class:`FunctionTool` is one function (name, description, JSON Schema of its arguments);
  :meth:`FunctionTool.of` takes OpenAI's ``{"type": "function", "function": {...}}``, the bare
  function object, or a pydantic model class (its name and fields);
- :func:`tool_choice_of` reads OpenAI's ``tool_choice`` (``auto``, ``none``, ``required``,
  ``{"type": "function", "function": {"name": ...}}``) into ``auto`` / ``none`` /
  ``required`` / :class:`ForcedFunction`.

The argument schemas are checked like a ``response_format``: a keyword the grammar cannot
express is an :class:`~ggufllm.errors.UnsupportedSchemaError` naming it and the tool.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidParameterError, UnsupportedSchemaError
from .schema import check_schema

__all__ = ["FunctionTool", "ForcedFunction", "ToolChoice", "tools_of", "tool_choice_of",
           "NO_PARAMETERS"]

# the arguments of a function declared without parameters: an empty object
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionTool(BaseModel):
    """A function the model may call."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_NAME, description="the function's name (OpenAI's rule: letters, "
                      "digits, _ and -, at most 64)")
    description: str = Field("", max_length=8192, description="shown to the model")
    parameters: dict[str, Any] | None = Field(None, description="the JSON Schema of its "
                                              "arguments (None: it takes none)")

    @classmethod
    def of(cls, value: Any, index: int = 0) -> FunctionTool:
        """The tool ``value`` describes.

        Args:
            value: a :class:`FunctionTool`; OpenAI's ``{"type": "function", "function":
                {"name", "description", "parameters"}}`` or its inner object; a pydantic model
                class (the name is the class's, the arguments its fields).
            index: its place in the list (for error messages).

        Raises:
            InvalidParameterError: not one of those.
            UnsupportedSchemaError: the parameters use what the grammar cannot express.
        """
        where = f"tools[{index}]"
        if isinstance(value, FunctionTool):
            tool = value
        elif isinstance(value, type) and issubclass(value, BaseModel):
            tool = cls(name=value.__name__[:64], description=(value.__doc__ or "").strip(),
                       parameters=value.model_json_schema())
        elif isinstance(value, dict):
            spec = value.get("function", value) if value.get("type", "function") == "function" \
                else None
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise InvalidParameterError(f"{where} must be {{\"type\": \"function\", "
                                            "\"function\": {\"name\": ...}}", "tools")
            try:
                tool = cls(name=spec["name"], description=spec.get("description") or "",
                           parameters=spec.get("parameters"))
            except ValueError as exc:
                raise InvalidParameterError(f"{where}: {_first_error(exc)}", "tools") from None
        else:
            raise InvalidParameterError(f"{where} must be a function object or a pydantic model "
                                        f"class (got {type(value).__name__})", "tools")
        tool.checked_parameters(index)
        return tool

    def checked_parameters(self, index: int = 0) -> dict[str, Any]:
        """The argument schema, checked (``{}`` parameters mean no arguments)."""
        schema = self.parameters if self.parameters else NO_PARAMETERS
        try:
            check_schema(schema)
        except UnsupportedSchemaError as exc:
            raise UnsupportedSchemaError(exc.keyword, exc.path, exc.reason,
                                         f"tools[{index}].function.parameters") from None
        except InvalidParameterError:
            raise InvalidParameterError(f"tools[{index}].function.parameters must be a JSON "
                                        "Schema object", "tools") from None
        return schema

    def schema_text(self) -> str:
        return json.dumps(self.parameters, ensure_ascii=False, separators=(",", ":"))


class ForcedFunction(BaseModel):
    """``tool_choice`` naming one function: the reply calls it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=_NAME)


ToolChoice = Literal["auto", "none", "required"] | ForcedFunction


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        err = errors()[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(exc)


def tools_of(values: Sequence[Any] | None) -> tuple[FunctionTool, ...]:
    """The tools of a call (see :meth:`FunctionTool.of`); names must be unique.

    Raises:
        InvalidParameterError, UnsupportedSchemaError.
    """
    if values is None:
        return ()
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
        raise InvalidParameterError("tools must be a list of functions", "tools")
    tools = tuple(FunctionTool.of(v, i) for i, v in enumerate(values))
    seen: set[str] = set()
    for tool in tools:
        if tool.name in seen:
            raise InvalidParameterError(f"tools: two functions are named {tool.name!r}", "tools")
        seen.add(tool.name)
    return tools


def tool_choice_of(value: Any, tools: Sequence[FunctionTool]) -> ToolChoice:
    """OpenAI's ``tool_choice`` as ggufllm takes it (None: ``auto``).

    Raises:
        InvalidParameterError: an unknown value, a function that is not among ``tools``, or
            ``required`` / a function without tools.
    """
    if value is None:
        return "auto"
    if isinstance(value, ForcedFunction):
        choice: ToolChoice = value
    elif value in ("auto", "none", "required"):
        choice = value
    elif isinstance(value, dict) and value.get("type") == "function" and isinstance(
            value.get("function"), dict) and isinstance(value["function"].get("name"), str):
        choice = ForcedFunction(name=value["function"]["name"])
    elif isinstance(value, str) and value in {t.name for t in tools}:
        choice = ForcedFunction(name=value)  # a bare function name (Python callers)
    else:
        raise InvalidParameterError("tool_choice must be \"auto\", \"none\", \"required\" or "
                                    "{\"type\": \"function\", \"function\": {\"name\": ...}} "
                                    f"(got {value!r})", "tool_choice")
    if isinstance(choice, ForcedFunction) and choice.name not in {t.name for t in tools}:
        raise InvalidParameterError(f"tool_choice names {choice.name!r}, which is not among the "
                                    "tools", "tool_choice")
    if choice == "required" and not tools:
        raise InvalidParameterError("tool_choice \"required\" needs tools", "tool_choice")
    return choice
