"""LangChain (``langchain-openai``) against the server, on the tiny gpt-oss: a tool loop with
``bind_tools`` and a structured answer with ``with_structured_output``.

The model has random weights: what is checked is what ggufllm guarantees whatever it writes
(a forced call names the function and its arguments validate; a structured answer parses
into the pydantic model), through a client many applications use as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from ggufllm import LLMService

from .server_fixture import running_server

langchain_openai = pytest.importorskip("langchain_openai")
messages = pytest.importorskip("langchain_core.messages")

_STRICT = ConfigDict(extra="forbid")


class get_weather(BaseModel):  # noqa: N801 (the function's name)
    """The weather in a city."""

    model_config = _STRICT
    city: Annotated[str, Field(max_length=12, description="the city")]
    unit: Literal["c", "f"]


class Forecast(BaseModel):
    """A short forecast."""

    model_config = _STRICT
    sky: Literal["clear", "cloudy", "rain"]
    high_c: Literal[10, 20, 30]
    note: Annotated[str, Field(max_length=12)]


@pytest.fixture(scope="module")
def llm(tiny_gguf) -> Iterator[object]:
    svc = LLMService(tiny_gguf("q8_0"), max_length=1024)
    with running_server(svc) as server:
        yield langchain_openai.ChatOpenAI(
            base_url=f"{server.url}/v1", api_key="none", model=server.model_id(),
            temperature=1.0, max_tokens=160, seed=3, max_retries=0)
    svc.close()


def test_bind_tools_loop(llm) -> None:
    ask = messages.HumanMessage("What is the weather in Paris?")
    caller = llm.bind_tools([get_weather], tool_choice="get_weather")
    first = caller.invoke([ask])
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    get_weather.model_validate(call["args"])
    result = messages.ToolMessage('{"temp_c": 21, "sky": "clear"}', tool_call_id=call["id"])
    answerer = llm.bind_tools([get_weather], tool_choice="none").bind(max_tokens=24)
    second = answerer.invoke([ask, first, result])
    assert isinstance(second, messages.AIMessage) and not second.tool_calls
    assert second.response_metadata["finish_reason"] in ("stop", "length")


def test_bind_tools_required_with_two_tools(llm) -> None:
    caller = llm.bind_tools([get_weather, Forecast], tool_choice="required")
    (call,) = caller.invoke("Plan my day in Paris.").tool_calls
    {"get_weather": get_weather, "Forecast": Forecast}[call["name"]].model_validate(call["args"])


def test_with_structured_output_pydantic(llm) -> None:
    structured = llm.with_structured_output(Forecast)
    forecast = structured.invoke("Tomorrow's forecast for Paris?")
    assert isinstance(forecast, Forecast)
