"""JSON-schema answers: from Python, the CLI and the server, on Gemma and the tiny gpt-oss.

The tiny gpt-oss has random weights: whatever it wants to write, a constrained answer must
parse and validate, its reasoning must stay in ``reasoning``/``reasoning_content``, and it
must arrive within ``max_tokens`` although the model would reason forever. Validation is
pydantic's (``extra="forbid"``: no property the schema does not name).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import openai
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict, Field

from ggufllm import LLMService
from ggufllm.cli import cli as cli_main
from ggufllm.errors import IncompleteAnswerError, UnsupportedSchemaError
from ggufllm.structured import ResponseFormat
from ggufllm.structured.schema import max_answer_tokens, schema_to_gbnf

from . import http_calls as http
from .server_fixture import running_server

_STRICT = ConfigDict(extra="forbid")


class City(BaseModel):
    model_config = _STRICT
    name: Annotated[str, Field(max_length=16)]
    country: Literal["FR", "DE", "IT", "other"]


class Trip(BaseModel):
    model_config = _STRICT
    city: City
    days: Annotated[list[Literal["mon", "tue", "wed"]], Field(max_length=3)]
    note: Annotated[str, Field(max_length=12)] | None


class Tags(BaseModel):
    model_config = _STRICT
    tags: Annotated[list[Annotated[str, Field(max_length=6)]], Field(min_length=1, max_length=3)]
    ok: bool


SCHEMAS = [City, Trip, Tags]
SEEDS = [0, 1]  # per schema and model: 6 sampled answers a model, each a different sample


# -- schema -> grammar (no model) ---------------------------------------------------------

@pytest.mark.parametrize("schema, keyword", [
    ({"type": "integer", "minimum": 0}, "minimum"),
    ({"type": "string", "format": "email"}, "format"),
    ({"oneOf": [{"type": "string"}, {"type": "null"}]}, "oneOf"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "maxLength"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
    ({"$ref": "https://example.com/s.json"}, "$ref"),
    ({"type": "object", "properties": {"a": {"nullable": True}}}, "nullable"),
])
def test_what_the_grammar_cannot_express_is_refused_by_name(schema: dict, keyword: str) -> None:
    with pytest.raises(UnsupportedSchemaError) as err:
        schema_to_gbnf(schema)
    assert err.value.keyword == keyword and keyword in str(err.value)


def test_strict_mode_schemas_convert_and_bounded_ones_have_a_token_bound() -> None:
    for model in SCHEMAS:
        gbnf = schema_to_gbnf(model.model_json_schema())
        assert "root ::=" in gbnf
        assert max_answer_tokens(model.model_json_schema()) is not None
    # a type list keeps its other keywords (the converter alone would drop maxLength)
    assert "char{0,5}" in schema_to_gbnf({"type": ["string", "null"], "maxLength": 5})
    assert max_answer_tokens({"type": "string"}) is None
    assert max_answer_tokens({"type": "object"}) is None
    formats = {"type": "object", "properties": {f: {"type": "string", "format": f} for f in
                                                ("date", "date-time", "time", "uuid")}}
    assert max_answer_tokens(formats) is not None
    assert ResponseFormat.of({"type": "text"}) is None
    assert ResponseFormat.of({"type": "json_object"}).json_schema == {"type": "object"}


# -- Gemma (the default model) ------------------------------------------------------------

def _valid(model: type[BaseModel], text: str) -> BaseModel:
    return model.model_validate_json(text)


@pytest.mark.parametrize("model", SCHEMAS)
def test_gemma_answers_parse_and_validate_at_temperature_1(service: LLMService,
                                                           model: type[BaseModel]) -> None:
    for seed in SEEDS:
        answer = service.answer("Describe a trip to Paris.", response_format=model,
                                temperature=1.0, seed=seed, max_tokens=200)
        assert answer.finish_reason == "stop", answer
        _valid(model, answer.text)


def test_a_pydantic_class_returns_an_instance_and_greedy_respects_the_grammar(
        service: LLMService) -> None:
    city = service.generate_answer("Which city is the capital of France?",
                                   response_format=City, temperature=0.0, max_tokens=80)
    assert isinstance(city, City)
    text = service.generate_answer("Which city is the capital of France?",
                                   response_format=City.model_json_schema(), temperature=0.0,
                                   max_tokens=80)
    assert City.model_validate_json(text) == city


def test_a_cut_answer_says_length_and_never_passes_for_whole(service: LLMService) -> None:
    answer = service.answer("Describe Paris.", response_format=Trip, temperature=1.0, seed=3,
                            max_tokens=4)
    assert answer.finish_reason == "length"
    with pytest.raises(IncompleteAnswerError):
        service.generate_answer("Describe Paris.", response_format=Trip, max_tokens=4, seed=3)


def test_unsupported_keyword_is_refused_before_decoding(service: LLMService) -> None:
    with pytest.raises(UnsupportedSchemaError, match="minimum"):
        service.answer("x", response_format={"type": "integer", "minimum": 1})


def test_cli_json_schema(tmp_path: Path, default_gguf: Path) -> None:
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps(City.model_json_schema()))
    result = CliRunner().invoke(cli_main, ["ask", "The capital of France?", "-m", str(default_gguf),
                                           "--json-schema", str(schema), "-t", "0",
                                           "--max-tokens", "80", "--ctx", "1024"])
    assert result.exit_code == 0, result.output
    City.model_validate_json(result.stdout.strip())


# -- the server, with the real openai client ------------------------------------------------

@pytest.fixture(scope="module")
def gemma_server(service: LLMService) -> Iterator[str]:
    with running_server(service) as server:
        yield server.url


def test_openai_parse_returns_a_parsed_object(gemma_server: str) -> None:
    with openai.OpenAI(base_url=f"{gemma_server}/v1", api_key="x", max_retries=0) as client:
        done = client.chat.completions.parse(
            model="default", messages=[{"role": "user", "content": "Capital of Italy?"}],
            response_format=City, temperature=1.0, seed=4, max_tokens=120)
    parsed = done.choices[0].message.parsed
    assert isinstance(parsed, City) and done.choices[0].finish_reason == "stop"


def test_unsupported_keyword_is_a_400_naming_it(gemma_server: str) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": {
            "type": "object", "properties": {"n": {"type": "number", "maximum": 3}}}}}}
    for path, extra in (("/v1/chat/completions", {}), ("/answer", {"question": "x"})):
        payload = {**body, **extra}
        if path == "/answer":
            del payload["messages"]
        r = http.post(f"{gemma_server}{path}", json=payload, timeout=60)
        assert r.status_code == 400, r.text
        assert "maximum" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "response_format"


def test_answer_route_takes_a_json_object_format(gemma_server: str) -> None:
    r = http.post(f"{gemma_server}/answer", timeout=120, json={
        "question": "Give the capital of France as JSON.", "temperature": 0, "max_tokens": 60,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "city", "schema": City.model_json_schema()}}})
    assert r.status_code == 200, r.text
    City.model_validate_json(r.json()["answer"])


# -- gpt-oss (harmony): reasoning free, the final channel constrained -----------------------

@pytest.fixture(scope="module")
def tiny_service(tiny_gguf) -> Iterator[LLMService]:
    svc = LLMService(tiny_gguf("q8_0"), max_length=512)
    svc.load()
    yield svc
    svc.close()


@pytest.mark.parametrize("model", SCHEMAS)
def test_gpt_oss_answers_within_the_budget_though_it_would_reason_forever(
        tiny_service: LLMService, model: type[BaseModel]) -> None:
    for seed in SEEDS:
        answer = tiny_service.answer("Describe a trip.", response_format=model,
                                     temperature=1.0, seed=seed, max_tokens=160)
        assert answer.finish_reason == "stop", answer
        assert len(answer.token_ids) <= 160
        _valid(model, answer.text)


def test_gpt_oss_reasoning_budget_forces_the_answer(tiny_service: LLMService) -> None:
    answer = tiny_service.answer("Describe a trip.", response_format=City, temperature=1.0,
                                 seed=7, max_tokens=300, reasoning_budget=5)
    assert answer.finish_reason == "stop"
    _valid(City, answer.text)
    # 5 analysis tokens, two headers and at most the answer's bound
    bound = max_answer_tokens(City.model_json_schema())
    assert bound is not None and len(answer.token_ids) <= 5 + 32 + bound


@pytest.fixture(scope="module")
def tiny_server(tiny_service: LLMService) -> Iterator[str]:
    with running_server(tiny_service) as server:
        yield server.url


def test_gpt_oss_server_keeps_reasoning_out_of_content(tiny_server: str) -> None:
    body = {"messages": [{"role": "user", "content": "Describe a trip."}], "max_tokens": 160,
            "temperature": 1.0, "seed": 2,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "trip", "schema": Trip.model_json_schema(), "strict": True}}}
    r = http.post(f"{tiny_server}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    _valid(Trip, message["content"])  # pure JSON: no reasoning in it
    # another sample (seed 5), streamed
    streamed = http.post(f"{tiny_server}/v1/chat/completions",
                         json={**body, "seed": 5, "stream": True}, timeout=300)
    # reasoning_budget over HTTP (the service-level test shows the budget forcing the answer)
    budgeted = http.post(f"{tiny_server}/v1/chat/completions", timeout=300,
                         json={**body, "reasoning_budget": 0})
    bad = http.post(f"{tiny_server}/v1/chat/completions", timeout=60,
                    json={**body, "reasoning_budget": -1})
    content = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                      for line in streamed.text.splitlines()
                      if line.startswith("data: {") and json.loads(line[6:])["choices"])
    _valid(Trip, content)
    assert budgeted.status_code == 200, budgeted.text[:500]
    _valid(Trip, budgeted.json()["choices"][0]["message"]["content"])
    assert budgeted.json()["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    assert bad.status_code == 400 and "reasoning_budget" in bad.json()["error"]["message"]


def test_the_guide_forces_the_final_header_when_the_budget_runs_out() -> None:
    """A model that reasons forever: analysis tokens until the budget leaves only what the
    answer needs, then the whole final-channel header, token by token."""
    from ggufllm.harmony import HarmonyTokens
    from ggufllm.harmony.constrain import HEADER_TEXT, AnswerGuide, Phase

    t = HarmonyTokens(start=1, end=2, message=3, channel=4, constrain=5, return_=6, call=7)
    words = {"<|end|>": [2], "<|start|>": [1], "<|channel|>": [4], "<|constrain|>": [5],
             "<|message|>": [3], "assistant": [10], "final": [11], " ": [12], "json": [13]}
    pieces = {20: b"analysis", 10: b"assistant", 11: b"final", 12: b" ", 13: b"json"}
    guide = AnswerGuide(t, lambda text: words[text], lambda tok: pieces.get(tok, b"x"),
                        max_tokens=100, answer_tokens=20)
    written = []
    for token in [4, 20, 3]:  # <|channel|>analysis<|message|>
        guide.observe(token)
        written.append(token)
    while guide.forced() is None:  # reasoning, forever
        guide.observe(99)
        written.append(99)
    assert 100 - len(written) == guide.reserve  # forced exactly when the reserve is left
    header = [tok for text in HEADER_TEXT for tok in words[text]]
    for want in header:
        assert guide.forced() == want
        guide.observe(want)
    assert guide.phase is Phase.ANSWER and guide.forced() is None


def test_a_date_is_a_calendar_date() -> None:
    """``format: date`` accepts exactly what ``date.fromisoformat`` reads: no September 31st,
    February 29th in leap years only, no year 0000 (llama.cpp's own rule takes all three)."""
    import datetime as dt
    import re

    from ggufllm.structured.schema import _DATE

    assert "date ::=" in schema_to_gbnf({"type": "string", "format": "date"})
    # the rule is literals, classes and groups: as a regular expression it reads the same
    rule = re.compile(re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), _DATE)
                      .replace(" ", ""))
    for year in [*range(0, 13), *range(1896, 1905), *range(1996, 2005), 2100, 2400, 9999]:
        for month in range(0, 14):
            for day in range(0, 33):
                text = f"{year:04d}-{month:02d}-{day:02d}"
                try:
                    dt.date.fromisoformat(text)
                    valid = True
                except ValueError:
                    valid = False
                assert bool(rule.fullmatch(text)) == valid, text
