"""Request and response bodies, mirroring OpenAI's schema (and the seed's ``/answer``).

Requests are validated strictly (no string-to-number coercion, finite floats
only, ranges checked): anything else is a 400 in OpenAI's error shape. Fields
OpenAI defines that this server does not implement are rejected when they ask
for something (``n > 1``, ``logprobs``, ``echo``); unknown extra fields are
ignored, as OpenAI-compatible servers do, so clients that send more still work.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "AnswerRequest", "Usage",
           "StreamOptions", "ContentPart", "ResponseFormatSpec", "JSONSchemaFormat", "MAX_STOPS",
           "MAX_STOP_CHARS", "ToolSpec", "FunctionSpec", "ToolCallSpec", "MAX_TOOLS"]

_REQUEST = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

Role = Literal["system", "developer", "user", "assistant", "tool"]
# functions one request may offer (each one's schema becomes part of the grammar)
MAX_TOOLS = 128
# OpenAI takes up to 4 stop strings; ggufllm kept the 16 it always took, and bounds their
# length, since every one is searched for in the answer's tail at every token
MAX_STOPS = 16
MAX_STOP_CHARS = 256


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are supported."""

    model_config = _REQUEST
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    """``tool_calls[].function`` of an assistant message: the call it made."""

    model_config = _REQUEST
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1 << 20)


class ToolCallSpec(BaseModel):
    """One of an assistant message's ``tool_calls``."""

    model_config = _REQUEST
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    """One message of ``messages``: ``tool`` messages carry a function's result for the call
    ``tool_call_id``; assistant messages may carry their ``tool_calls`` and the
    ``reasoning_content`` gpt-oss wrote before them (passed back between calls)."""

    model_config = _REQUEST
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=256)
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class JSONSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema an answer must match."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore",
                              populate_by_name=True)
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatSpec(BaseModel):
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema`` (the answer
    is constrained by a grammar; a schema it cannot express is a 400 naming the keyword)."""

    model_config = _REQUEST
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _has_schema(self) -> ResponseFormatSpec:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required with type json_schema")
        return self

    def for_service(self) -> dict[str, Any] | None:
        """The ``response_format`` argument of the service's calls (None: free text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        spec = self.json_schema
        assert spec is not None
        return {"type": "json_schema", "json_schema": {
            "name": spec.name, "description": spec.description, "schema": spec.schema_ or {},
            "strict": spec.strict is not False}}


class FunctionSpec(BaseModel):
    """``tools[].function``: a function the model may call."""

    model_config = _REQUEST
    name: str = Field(min_length=1, max_length=64)
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # accepted: the arguments always follow the schema


class ToolSpec(BaseModel):
    """One of ``tools``."""

    model_config = _REQUEST
    type: Literal["function"]
    function: FunctionSpec

    def for_service(self) -> dict[str, Any]:
        f = self.function
        return {"type": "function", "function": {
            "name": f.name, "description": f.description, "parameters": f.parameters}}


class StreamOptions(BaseModel):
    model_config = _REQUEST
    include_usage: bool = False


class _Sampling(BaseModel):
    """Parameters shared by every generation route."""

    model_config = _REQUEST
    model: str | None = Field(None, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1 << 20)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=0, lt=1 << 32)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: object) -> object:
        # before the type check, so that every problem is reported on `stop` itself
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings (got {len(stops)})")
        if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return value

    def budget(self) -> int | None:
        return self.max_tokens

    def generation_params(self) -> dict[str, Any]:
        """The service's per-call parameters this request sets (None: the default)."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        budget = self.budget()
        params: dict[str, Any] = dict(
            max_tokens=budget, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repeat_penalty=self.repeat_penalty, seed=self.seed,
            stop=tuple(stop) if stop else None)
        return {k: v for k, v in params.items() if v is not None}


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    # gpt-oss with a response_format or a forced call: the most analysis tokens before the
    # answer is forced (llama-server's --reasoning-budget, per request)
    reasoning_budget: int | None = Field(None, ge=0, le=1 << 20)
    logprobs: Literal[False] | None = None
    response_format: ResponseFormatSpec | None = None
    tools: list[ToolSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted: a gpt-oss reply makes one call

    @property
    def calls_offered(self) -> bool:
        """Whether the reply may call a function (tools given, tool_choice not ``none``)."""
        return bool(self.tools) and self.tool_choice != "none"

    @field_validator("messages")
    @classmethod
    def _has_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" for m in messages):
            raise ValueError("messages must contain at least one user message")
        return messages

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def generation_params(self) -> dict[str, Any]:
        params = super().generation_params()
        if self.reasoning_effort is not None:
            params["reasoning_effort"] = self.reasoning_effort
        if self.reasoning_budget is not None:
            params["reasoning_budget"] = self.reasoning_budget
        if self.tools or self.tool_choice is not None:
            params["tools"] = [t.for_service() for t in self.tools or ()]
            params["tool_choice"] = self.tool_choice
        return params | _format_param(self.response_format)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: the prompt is continued as raw text. Without ``max_tokens``
    the budget is the server's default capped to the window, as on every route (OpenAI's
    legacy default of 16 is not kept)."""

    prompt: str | list[str] = Field(...)
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request")
        if not (value if isinstance(value, str) else value[0]).strip():
            raise ValueError("the prompt is empty")
        return value

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class AnswerRequest(BaseModel):
    """``POST /answer``: the seed service's RAG call."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
    question: str = Field(min_length=1)
    context: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    reasoning_budget: int | None = Field(None, ge=0, le=1 << 20)
    seed: int | None = Field(None, ge=0, lt=1 << 32)
    stream: bool = False
    response_format: ResponseFormatSpec | None = None

    def generation_params(self) -> dict[str, Any]:
        params: dict[str, Any] = dict(max_tokens=self.max_tokens, temperature=self.temperature,
                                      reasoning_effort=self.reasoning_effort,
                                      reasoning_budget=self.reasoning_budget, seed=self.seed)
        return {k: v for k, v in params.items() if v is not None} | _format_param(
            self.response_format)


def _format_param(spec: ResponseFormatSpec | None) -> dict[str, Any]:
    """``response_format`` as the service takes it, when the request asks for one."""
    value = spec.for_service() if spec is not None else None
    return {"response_format": value} if value is not None else {}


class Usage(BaseModel):
    """OpenAI's ``usage`` object, with the cache and reasoning details."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]
    completion_tokens_details: dict[str, int]
