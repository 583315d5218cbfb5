"""Tool calls: from Python and the server (the official ``openai`` client), on the tiny gpt-oss.

The tiny gpt-oss has random weights: whatever it wants to write, a forced call must name an
offered function and carry arguments that validate against its schema (pydantic models with
``extra="forbid"``), its reasoning must stay out of ``arguments`` and ``content``, and a
streamed call must reassemble to exactly the non-streamed one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from ggufllm import LLMService, Turn
from ggufllm.chunks import Answer
from ggufllm.errors import InvalidParameterError, UnsupportedSchemaError
from ggufllm.structured.tools import tool_choice_of, tools_of

from . import http_calls as http
from .server_fixture import running_server

_STRICT = ConfigDict(extra="forbid")


class get_weather(BaseModel):  # noqa: N801 (the function's name)
    """The weather in a city."""

    model_config = _STRICT
    city: Annotated[str, Field(max_length=12)]
    unit: Literal["c", "f"]


class search(BaseModel):  # noqa: N801
    """Search the documents."""

    model_config = _STRICT
    query: Annotated[str, Field(max_length=16)]
    top_k: Literal[1, 3, 5]


class add_event(BaseModel):  # noqa: N801
    """Add a calendar event."""

    model_config = _STRICT
    title: Annotated[str, Field(max_length=10)]
    days: Annotated[list[Literal["mon", "tue", "wed"]], Field(max_length=2)]
    urgent: bool


FUNCTIONS = [get_weather, search, add_event]
BY_NAME = {f.__name__: f for f in FUNCTIONS}
ASK = [Turn("user", "What is the weather in Paris?")]
BUDGET = dict(max_tokens=160, temperature=1.0)


def _valid(name: str, arguments: str) -> BaseModel:
    return BY_NAME[name].model_validate_json(arguments)


# -- tools and tool_choice (no model) ------------------------------------------------------

def test_tools_take_openai_objects_and_pydantic_classes() -> None:
    spec = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}}}}
    tools = tools_of([spec, search])
    assert [t.name for t in tools] == ["f", "search"]
    assert tools[1].description == "Search the documents."
    assert tool_choice_of({"type": "function", "function": {"name": "f"}}, tools).name == "f"
    assert tool_choice_of(None, tools) == "auto"


@pytest.mark.parametrize("tools, choice, what", [
    ([{"type": "function", "function": {"name": "bad name"}}], None, r"tools\[0\]: name"),
    ([search, search], None, "two functions"),
    ([search], {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    ([], "required", "needs tools"),
    ([search], "sometimes", "tool_choice must be"),
])
def test_bad_tools_are_refused(tools, choice, what) -> None:
    with pytest.raises(InvalidParameterError, match=what):
        tool_choice_of(choice, tools_of(tools))


def test_an_unsupported_keyword_in_parameters_is_named() -> None:
    spec = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}}}
    with pytest.raises(UnsupportedSchemaError) as err:
        tools_of([{"type": "function", "function": {"name": "g"}}, spec])
    assert err.value.keyword == "minimum"
    assert "tools[1].function.parameters" in str(err.value)


# -- the lazy grammar of auto, in llama.cpp (vocabulary only) -------------------------------

def _grammar_takes(model, spec_of, reply: str) -> bool:
    """Whether llama.cpp's grammar sampler, built by ``spec_of(vocab)`` on the vocabulary of
    ``model``, takes ``reply`` token by token."""
    import ctypes
    import math

    import llama_cpp.llama_cpp as lib

    from ggufllm.engine.sampling import VocabView, _grammar_sampler

    vocab = VocabView(model.vocab, model.ptr)
    sampler = _grammar_sampler(vocab, spec_of(vocab))

    def allowed(token: int) -> bool:
        one = (lib.llama_token_data * 1)()
        one[0].id, one[0].logit = token, 0.0
        lib.llama_sampler_apply(sampler, ctypes.byref(
            lib.llama_token_data_array(one, 1, -1, False)))
        return not math.isinf(one[0].logit)

    try:
        for token in vocab.tokenize(reply):
            if not allowed(token):
                return False
            lib.llama_sampler_accept(sampler, token)
        return True
    finally:
        lib.llama_sampler_free(sampler)


@pytest.mark.parametrize("reply", [
    "<|channel|>analysis<|message|>maybe to=functions.search later<|end|><|start|>assistant"
    "<|channel|>commentary to=functions.search <|constrain|>json<|message|>",
    " to=functions.search<|channel|>commentary <|constrain|>json<|message|>",
    "<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.search"
    "<|channel|>commentary<|message|>",
], ids=["after the channel", "in the role, first", "in the role, later"])
def test_auto_grammar_waits_for_the_recipient_then_constrains(tiny_vocab, reply) -> None:
    """Free text (the recipient named in reasoning included) passes; once the model writes a
    call's header the arguments must follow the schema."""
    from ggufllm.harmony.tools import calls_grammar, trigger_patterns
    from ggufllm.structured.plan import GrammarSpec

    def spec(vocab):
        gbnf, root = calls_grammar(tools_of([search]), vocab.harmony(), forced=False)
        return GrammarSpec(gbnf, root, trigger_patterns())

    assert _grammar_takes(tiny_vocab, spec, reply)
    assert _grammar_takes(tiny_vocab, spec, reply + "{")
    assert not _grammar_takes(tiny_vocab, spec, reply + "x")


class Place(BaseModel):
    """An answer's shape, beside the tools (tool_choice auto with a response_format)."""

    model_config = _STRICT
    city: Annotated[str, Field(max_length=12)]
    rank: Literal[1, 2, 3]


@pytest.mark.parametrize("reply, ok", [
    ('<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final '
     '<|constrain|>json<|message|>{"city": "Paris", "rank": 1}', True),
    ("<|channel|>commentary to=functions.search <|constrain|>json<|message|>"
     '{"query": "paris", "top_k": 3}', True),
    ("<|channel|>final<|message|>Paris", False),
    ('<|channel|>final<|message|>{"city": "Paris", "rank": 4}', False),
    ('<|channel|>commentary to=functions.search<|message|>{"query": 1', False),
], ids=["final JSON", "a call", "final prose", "final off-schema", "call off-schema"])
def test_answer_or_call_grammar_takes_the_answer_or_a_call_and_nothing_else(
        tiny_vocab, reply, ok) -> None:
    """``tools`` (auto) with a ``response_format``: after free analysis the reply is either
    a final answer that follows the format or a call whose arguments follow its function's."""
    from ggufllm.harmony.tools import answer_or_call_grammar
    from ggufllm.structured import ResponseFormat
    from ggufllm.structured.plan import GrammarSpec
    from ggufllm.structured.schema import schema_to_gbnf

    def spec(vocab):
        fmt = ResponseFormat.of(Place)
        return GrammarSpec(*answer_or_call_grammar(schema_to_gbnf(fmt.json_schema),
                                                   tools_of([search]), vocab.harmony()))

    assert _grammar_takes(tiny_vocab, spec, reply) is ok


# -- Python, on the tiny gpt-oss -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_service(tiny_gguf) -> Iterator[LLMService]:
    svc = LLMService(tiny_gguf("q8_0"), max_length=1024)
    svc.load()
    yield svc
    svc.close()


@pytest.mark.parametrize("seed", range(4))
def test_required_always_calls_with_schema_valid_arguments(tiny_service, seed) -> None:
    answer = tiny_service.chat(ASK, tools=FUNCTIONS, tool_choice="required", seed=seed, **BUDGET)
    assert answer.finish_reason == "tool_call"
    (call,) = answer.tool_calls
    _valid(call.name, call.arguments)
    assert answer.text == ""
    assert call.id.startswith("call_") and call.arguments not in answer.reasoning


@pytest.mark.parametrize("name", list(BY_NAME))
def test_a_named_function_is_the_one_called(tiny_service, name) -> None:
    answer = tiny_service.chat(ASK, tools=FUNCTIONS, tool_choice=name, seed=7, **BUDGET)
    (call,) = answer.tool_calls
    assert call.name == name
    _valid(name, call.arguments)


def test_a_forced_call_arrives_within_max_tokens_after_reasoning(tiny_service) -> None:
    """A reasoning budget lets the model reason first; the guide then writes the call."""
    answer = tiny_service.chat(ASK, tools=[search], tool_choice="required", seed=3,
                               reasoning_budget=24, max_tokens=200, temperature=1.0)
    (call,) = answer.tool_calls
    _valid("search", call.arguments)
    assert answer.timings is not None and answer.timings.n_generated <= 200


def test_auto_and_none_never_break_the_reply(tiny_service) -> None:
    for choice in ("auto", "none"):
        for seed in range(2):
            answer = tiny_service.chat(ASK, tools=FUNCTIONS, tool_choice=choice, seed=seed,
                                       max_tokens=48, temperature=1.0)
            assert answer.finish_reason in ("stop", "length", "tool_call")
            for call in answer.tool_calls:  # auto: a call the model chose is valid too
                assert choice == "auto"
                _valid(call.name, call.arguments)


@pytest.mark.parametrize("budget", [None, 0])
def test_auto_with_a_response_format_answers_in_the_format_or_calls(tiny_service, budget):
    """Whatever the random weights write, each reply is a schema-valid call or a final answer
    that validates against the format; with no reasoning budget left the guide writes the
    answer's header at once, so every reply is the answer. Without a budget, seeds until both
    kinds of reply were checked (at most 6); with none left, 3."""
    kinds = set()
    for seed in range(6 if budget is None else 3):
        answer = tiny_service.chat(ASK, tools=FUNCTIONS, tool_choice="auto", response_format=Place,
                                   seed=seed, reasoning_budget=budget, max_tokens=200,
                                   temperature=1.0)
        if answer.tool_calls:
            (call,) = answer.tool_calls
            _valid(call.name, call.arguments)
            assert answer.finish_reason == "tool_call" and answer.text == ""
            kinds.add("call")
        else:
            assert answer.finish_reason == "stop", answer
            Place.model_validate_json(answer.text)
            assert answer.text not in answer.reasoning or not answer.reasoning
            kinds.add("answer")
        if kinds == {"call", "answer"}:
            break  # both kinds checked (with no budget left: a call, which fails below)
    assert kinds == {"answer"} if budget == 0 else kinds


def test_a_forced_call_leaves_the_response_format_aside(tiny_service) -> None:
    answer = tiny_service.chat(ASK, tools=FUNCTIONS, tool_choice="search", response_format=Place,
                               seed=4, **BUDGET)
    (call,) = answer.tool_calls
    _valid("search", call.arguments)
    plain = tiny_service.chat(ASK, tools=FUNCTIONS, tool_choice="none", response_format=Place,
                              seed=4, **BUDGET)
    assert not plain.tool_calls and plain.finish_reason == "stop"
    Place.model_validate_json(plain.text)


def test_streamed_call_pieces_name_it_first_then_add_arguments(tiny_service) -> None:
    with tiny_service.chat_stream(ASK, tools=FUNCTIONS, tool_choice="required", seed=1,
                                  **BUDGET) as stream:
        chunks = list(stream)
    pieces = [c.tool_call for c in chunks if c.tool_call is not None]
    assert pieces[0].id and pieces[0].name and pieces[0].arguments == ""
    assert all(p.id is None and p.name is None and p.index == 0 for p in pieces[1:])
    assert len([p for p in pieces if p.arguments]) > 1  # streamed, not in one piece
    assert all(not c.text for c in chunks if c.tool_call is not None)
    call = Answer.from_chunks(chunks).tool_calls[0]
    assert call.arguments == "".join(p.arguments for p in pieces)


def test_a_tool_loop_from_python(tiny_service) -> None:
    first = tiny_service.chat(ASK, tools=FUNCTIONS, tool_choice="get_weather", seed=2, **BUDGET)
    call = first.tool_calls[0]
    turns = [*ASK, Turn("assistant", first.text, first.reasoning, first.tool_calls),
             Turn("tool", json.dumps({"temp_c": 21, "sky": "clear"}), name=call.name)]
    second = tiny_service.chat(turns, tools=FUNCTIONS, tool_choice="none", seed=2,
                               max_tokens=32, temperature=1.0)
    assert second.tool_calls == () and second.finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def smollm2_service(smollm2_gguf) -> Iterator[LLMService]:
    """A model without harmony (one load, from Python and behind the server)."""
    with LLMService(smollm2_gguf, max_length=512) as svc:
        yield svc


def test_a_model_without_harmony_has_no_tools(smollm2_service) -> None:
    with pytest.raises(InvalidParameterError, match="no tool-call support"):
        smollm2_service.chat(ASK, tools=[search], max_tokens=4)
    with pytest.raises(InvalidParameterError, match="no tool-call support"):
        smollm2_service.chat([*ASK, Turn("tool", "x", name="search")], max_tokens=4)


# -- the server, through the official client -----------------------------------------------

def _openai_tools() -> list[dict]:
    return [{"type": "function", "function": {
        "name": f.__name__, "description": f.__doc__, "parameters": f.model_json_schema()}}
        for f in FUNCTIONS]


@pytest.fixture(scope="module")
def running(tiny_service):
    with running_server(tiny_service) as running:
        yield running


@pytest.fixture(scope="module")
def server(running) -> str:
    return running.url


@pytest.fixture(scope="module")
def client(running) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none")
    client.model_id = running.model_id()  # type: ignore[attr-defined]
    return client


def _create(client, stream: bool = False, **kwargs):
    params = dict(model=client.model_id, messages=[{"role": "user", "content": "Weather in Paris?"}],
                  tools=_openai_tools(), tool_choice="required", max_tokens=160, temperature=1.0,
                  seed=5) | kwargs
    return client.chat.completions.create(stream=stream, **params)


@pytest.mark.parametrize("seed", range(3))
def test_server_required_returns_valid_tool_calls(client, seed) -> None:
    out = _create(client, seed=seed)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    _valid(call.function.name, call.function.arguments)
    assert not choice.message.content


def test_server_streamed_call_reassembles_to_the_non_streamed_one(client) -> None:
    whole = _create(client, seed=11).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    reasoning = []
    for chunk in _create(client, stream=True, seed=11):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        for piece in delta.tool_calls or ():
            if piece.id:  # the first piece names the call
                assert piece.index not in calls and piece.function.name
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "args": ""}
            calls[piece.index]["args"] += piece.function.arguments or ""
    assert finish == whole.finish_reason == "tool_calls"
    (call,) = whole.message.tool_calls
    assert [(c["name"], c["args"]) for c in calls.values()] == [
        (call.function.name, call.function.arguments)]
    assert "".join(reasoning) == (getattr(whole.message, "reasoning_content", None) or "")


def test_server_tool_loop_with_the_official_client(client) -> None:
    messages: list[dict] = [{"role": "user", "content": "Weather in Paris?"}]
    first = _create(client, messages=messages, tool_choice={
        "type": "function", "function": {"name": "get_weather"}}).choices[0].message
    call = first.tool_calls[0]
    assert call.function.name == "get_weather"
    messages.append(first.model_dump(exclude_none=True))  # reasoning_content rides along
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'})
    second = _create(client, messages=messages, tool_choice="none", max_tokens=24)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert not second.choices[0].message.tool_calls


def test_server_tools_with_a_response_format(client) -> None:
    """OpenAI's tools and response_format in one request: a call, or content in the format
    (seeds until both kinds of reply were checked, at most 3)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "Place", "strict": True,
                                                  "schema": Place.model_json_schema()}}
    kinds = set()
    for seed in range(3):
        out = _create(client, tool_choice="auto", response_format=fmt, seed=seed,
                      max_tokens=200, extra_body={"reasoning_budget": 16})
        choice = out.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and not choice.message.content
            call = choice.message.tool_calls[0].function
            _valid(call.name, call.arguments)
            kinds.add("call")
        else:
            assert choice.finish_reason == "stop"
            Place.model_validate_json(choice.message.content)
            kinds.add("answer")
        if len(kinds) == 2:
            break


def test_server_refuses_what_it_cannot_do(server, smollm2_service) -> None:
    def post(body: dict) -> httpx.Response:
        return http.post(f"{server}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | body, timeout=60)

    unsupported = post({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}}}}]})
    assert unsupported.status_code == 400 and "'maximum'" in unsupported.json()["error"]["message"]
    orphan = post({"messages": [{"role": "user", "content": "hi"},
                                {"role": "tool", "tool_call_id": "call_x", "content": "1"}]})
    assert orphan.status_code == 400 and "call_x" in orphan.json()["error"]["message"]
    unnamed = post({"tools": _openai_tools(),
                    "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert unnamed.status_code == 400
    with running_server(smollm2_service) as other:
        r = http.post(f"{other.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "tools": _openai_tools(),
            "max_tokens": 4}, timeout=120)
    assert r.status_code == 400 and "no tool-call support" in r.json()["error"]["message"]


def test_server_without_tools_reports_no_calls(client) -> None:
    out = client.chat.completions.create(
        model=client.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=16, seed=1)
    assert not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason in ("stop", "length")


def test_the_vocabulary_scan_runs_on_the_callers_thread(tiny_service, monkeypatch) -> None:
    """A grammar's first read of the vocabulary (~0.5 s on o200k) never stalls the thread that
    decodes every other request."""
    import threading

    from ggufllm.engine import sampling

    threads = []
    scan = sampling.VocabView._scan

    def recorded(self):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return scan(self)

    from ggufllm.engine import vocab_memo

    monkeypatch.setattr(vocab_memo, "_values", {})  # nothing known of the vocabulary yet
    monkeypatch.setattr(sampling.VocabView, "_scan", recorded)
    answer = tiny_service.chat(ASK, tools=FUNCTIONS, tool_choice="required", seed=0, **BUDGET)
    assert answer.tool_calls
    assert threads[0] == threading.current_thread().name
