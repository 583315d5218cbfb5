"""The OpenAI-compatible API on a real server (embedded model): the official client for the
happy paths, raw HTTP for every error case."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from ggufllm.server import ServerConfig

from . import http_calls as http
from .server_fixture import Running, running_server

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?"]
LIMIT = 32 * 1024


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    with running_server(config=ServerConfig(api_key=None, max_body_bytes=LIMIT)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Running) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _chat(client: openai.OpenAI, model: str, question: str, **kw: object) -> object:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=12,
        temperature=0, **kw)


# -- the official client -------------------------------------------------------


def test_models_lists_the_loaded_model(server: Running, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [server.model_id()]
    assert server.model_id() == "gemma-3-270m-q4_k_m"


def test_chat_non_stream_has_answer_and_usage(server: Running, client: openai.OpenAI) -> None:
    resp = _chat(client, server.model_id(), QUESTIONS[0])
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0
    assert 0 < resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.prompt_tokens_details.cached_tokens >= 0


def test_streamed_text_equals_non_streamed_at_temperature_0(server: Running,
                                                           client: openai.OpenAI) -> None:
    for question in QUESTIONS:
        whole = _chat(client, server.model_id(), question)
        stream = _chat(client, server.model_id(), question, stream=True,
                       stream_options={"include_usage": True})
        parts, finish, usage = [], None, None
        for event in stream:
            if event.usage is not None:
                usage = event.usage
            for choice in event.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(parts) == whole.choices[0].message.content
        assert finish == whole.choices[0].finish_reason
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_second_identical_prompt_reports_cached_tokens(server: Running,
                                                       client: openai.OpenAI) -> None:
    # long enough for an engine that reuses whole 64-token pages of a prefix
    question = "The sky is blue and the grass is green. " * 20 + QUESTIONS[1]
    _chat(client, server.model_id(), question)
    again = _chat(client, server.model_id(), question)
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens


def test_system_message_and_multi_turn(server: Running, client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=server.model_id(), max_completion_tokens=8, temperature=0, messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]}])
    assert resp.choices[0].message.content is not None
    assert resp.usage.completion_tokens <= 8


def test_without_max_tokens_the_budget_is_what_the_context_leaves(server: Running,
                                                                  client: openai.OpenAI) -> None:
    context = ("Paris is the capital and the largest city of France. It lies on the Seine, in "
               "the north of the country, and has been the seat of the French government for "
               "most of the last thousand years. ")
    resp = client.chat.completions.create(
        model=server.model_id(), temperature=0,
        messages=[{"role": "user", "content": context + QUESTIONS[0]}])
    # the service's default budget plus this prompt exceeds the 1024-token context
    assert server.service.generation_config.max_tokens + resp.usage.prompt_tokens > 1024
    assert resp.choices[0].message.content.strip()
    assert resp.usage.total_tokens <= 1024


def test_completions_stream_and_not(server: Running, client: openai.OpenAI) -> None:
    whole = client.completions.create(model=server.model_id(), prompt=QUESTIONS[0],
                                      max_tokens=10, temperature=0)
    assert whole.choices[0].text.strip()
    assert whole.usage.completion_tokens <= 10
    text = "".join(e.choices[0].text for e in client.completions.create(
        model=server.model_id(), prompt=QUESTIONS[0], max_tokens=10, temperature=0,
        stream=True))
    assert text == whole.choices[0].text
    # a raw continuation, as OpenAI's and llama-server's completions are
    cont = client.completions.create(model=server.model_id(), prompt="The capital of France is",
                                     max_tokens=4, temperature=0)
    assert cont.choices[0].text.startswith(" ") and cont.usage.prompt_tokens == 6  # BOS + 5


def test_answer_route_stream_equals_non_stream(server: Running) -> None:
    body = {"question": "What is the capital of France?", "context": "Paris is the capital of "
            "France.", "max_tokens": 10, "temperature": 0}
    whole = http.post(f"{server.url}/answer", json=body, timeout=120).json()
    assert set(whole) >= {"answer", "reasoning", "finish_reason", "usage"}
    events = _sse(http.post(f"{server.url}/answer", json={**body, "stream": True}, timeout=120))
    assert "".join(e.get("answer", "") for e in events) == whole["answer"]
    assert events[-1]["finish_reason"] == whole["finish_reason"]
    assert events[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


def test_metrics_count_requests_tokens_and_ttft(server: Running, client: openai.OpenAI) -> None:
    _chat(client, server.model_id(), QUESTIONS[2])
    text = http.get(f"{server.url}/metrics", timeout=10).text
    samples = _samples(text)
    assert samples['ggufllm_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert samples["ggufllm_generated_tokens_total"] >= 1
    assert samples["ggufllm_prompt_tokens_total"] >= 1
    assert samples["ggufllm_time_to_first_token_seconds_count"] >= 1
    assert samples["ggufllm_requests_in_flight"] == 0
    assert samples["ggufllm_requests_waiting_first_token"] == 0
    assert "ggufllm_kv_cache_hits_total" in samples


# -- errors: raw HTTP ------------------------------------------------------------

MSG = [{"role": "user", "content": "Hi"}]
BAD_BODIES = [
    ("not json", b'{"messages": [', "invalid_json"),
    ("NaN literal", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
     "invalid_json"),
    ("Infinity in an ignored field", b'{"messages": [{"role": "user", "content": "Hi"}], '
     b'"x": Infinity}', "invalid_json"),
    ("string for a number", json.dumps({"messages": MSG, "max_tokens": "5"}).encode(), None),
    ("bool for a number", json.dumps({"messages": MSG, "max_tokens": True}).encode(), None),
    ("temperature out of range", json.dumps({"messages": MSG, "temperature": 7}).encode(), None),
    ("negative max_tokens", json.dumps({"messages": MSG, "max_tokens": -1}).encode(), None),
    ("top_p zero", json.dumps({"messages": MSG, "top_p": 0}).encode(), None),
    ("empty messages", json.dumps({"messages": []}).encode(), None),
    ("no user message", json.dumps({"messages": [{"role": "system", "content": "x"}]}).encode(),
     None),
    ("unknown role", json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), None),
    ("image content", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}).encode(), None),
    ("n > 1", json.dumps({"messages": MSG, "n": 2}).encode(), None),
    ("body is a list", b"[1, 2]", None),
    ("bad reasoning_effort", json.dumps({"messages": MSG, "reasoning_effort": "max"}).encode(),
     None),
    ("seed too large", json.dumps({"messages": MSG, "seed": 1 << 40}).encode(), None),
    ("empty stop", json.dumps({"messages": MSG, "stop": [""]}).encode(), None),
]


@pytest.mark.parametrize("name,body,code", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_chat_bodies_are_400_in_openai_shape(server: Running, name: str, body: bytes,
                                                 code: str | None, stream: bool) -> None:
    if stream and body.startswith(b"{") and code is None:
        body = json.dumps({**json.loads(body), "stream": True}).encode()
    r = http.post(f"{server.url}/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    err = _error(r, 400)
    assert err["type"] == "invalid_request_error"
    if code:
        assert err["code"] == code


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": ["a", "b"]}),
    ("/v1/completions", {"prompt": "x", "echo": True}),
    ("/v1/completions", {"prompt": 5}),
    ("/answer", {"question": ""}),
    ("/answer", {"question": "q", "context": 5}),
    ("/answer", {"question": "q", "model_path": "/etc/passwd"}),
    ("/answer", {"question": "q", "temperature": -1}),
])
def test_bad_bodies_on_other_routes_are_400(server: Running, path: str, body: dict) -> None:
    _error(http.post(f"{server.url}{path}", json=body, timeout=30), 400)


@pytest.mark.parametrize("model", ["gpt-4o", "/etc/passwd", "../models/llm/x.gguf"])
def test_unknown_model_is_404_and_never_a_path(server: Running, model: str) -> None:
    r = http.post(f"{server.url}/v1/chat/completions", json={"model": model, "messages": MSG},
                   timeout=30)
    err = _error(r, 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/answer"])
@pytest.mark.parametrize("stream", [False, True])
def test_prompt_over_the_context_is_400_with_counts(server: Running, route: str,
                                                    stream: bool) -> None:
    long_text = "word " * 1500  # over the 1024-token context of the test server
    body = {"/v1/chat/completions": {"messages": [{"role": "user", "content": long_text}]},
            "/v1/completions": {"prompt": long_text},
            "/answer": {"question": "Why?", "context": long_text}}[route]
    r = http.post(f"{server.url}{route}", json={**body, "stream": stream, "max_tokens": 8},
                   timeout=60)
    err = _error(r, 400)
    assert err["type"] == "exceed_context_size_error"
    assert err["n_ctx"] == 1024 and err["n_prompt_tokens"] > 1024


def test_budget_over_the_context_is_400(server: Running) -> None:
    r = http.post(f"{server.url}/v1/chat/completions",
                   json={"messages": MSG, "max_tokens": 1020, "stream": True}, timeout=60)
    assert _error(r, 400)["n_ctx"] == 1024


def test_body_over_the_limit_is_413(server: Running) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (LIMIT + 10)}]}).encode()
    json_type = {"content-type": "application/json"}
    _error(http.post(f"{server.url}/v1/chat/completions", content=big, headers=json_type,
                      timeout=30), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    _error(http.post(f"{server.url}/v1/chat/completions", content=chunks(), headers=json_type,
                      timeout=30), 413)


def test_unknown_route_and_wrong_method(server: Running) -> None:
    assert _error(http.get(f"{server.url}/v1/nothing", timeout=10), 404)["type"]
    _error(http.get(f"{server.url}/v1/chat/completions", timeout=10), 405)


# bad requests of each kind a route can get: each must be a 4xx, none a 500
BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/answer", b'{"question": "\\ud800"}'),
    ("/v1/completions", b'{"prompt": "\\ud800"}'),
    ("/v1/chat/completions", b"[" * 5000),
    ("/v1/chat/completions", b'{"messages": '),
    ("/v1/chat/completions", b'{"messages": "Hi"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], '
                             b'"temperature": "hot"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], '
                             b'"max_tokens": 100000}'),  # reaches the service's budget check
    ("/answer", b'{"question": "Hi", "max_tokens": -1}'),
    ("/v1/completions", b'{"prompt": ""}'),
]


def _status_counts(server: Running) -> dict[str, float]:
    """``ggufllm_requests_total`` by status class ("4", "5"), /metrics itself left out."""
    counts: dict[str, float] = {}
    for k, v in _samples(http.get(f"{server.url}/metrics", timeout=10).text).items():
        if k.startswith("ggufllm_requests_total{") and 'route="/metrics"' not in k:
            status = k.split('status="')[1][0]
            counts[status] = counts.get(status, 0) + v
    return counts


def test_errors_never_5xx(server: Running) -> None:
    # what this test sends, counted as a delta: other tests' requests do not matter
    before = _status_counts(server)
    for path, body in BAD_REQUESTS:
        r = http.post(f"{server.url}{path}", content=body, timeout=60,
                       headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (path, body[:60], r.status_code, r.text[:200])
        _error(r, r.status_code)
    after = _status_counts(server)
    assert after.get("5", 0) - before.get("5", 0) == 0
    assert after.get("4", 0) - before.get("4", 0) == len(BAD_REQUESTS)  # the counter saw them


# -- a window smaller than DEFAULT_MAX_TOKENS ----------------------------------------

SMALL_CTX = 256


def test_a_ctx_below_the_default_budget_answers_without_max_tokens() -> None:
    # DEFAULT_MAX_TOKENS (1000) does not fit a 256-token window: it is capped to what the
    # window leaves; only a max_tokens the client sent can be refused
    with running_server(max_length=SMALL_CTX) as small:
        assert small.service.generation_config.max_tokens > SMALL_CTX
        # (a stop string ends an answer early: its budget was settled, or refused, before it)
        short = [("/v1/chat/completions", {"messages": [{"role": "user", "content":
                                                          QUESTIONS[0]}], "stop": ["\n", "."]}),
                 ("/answer", {"question": QUESTIONS[0]}),
                 ("/v1/completions", {"prompt": "The capital of France is", "stop": ["."]})]
        for path, body in short:
            for stream in (False, True):
                r = http.post(f"{small.url}{path}", json={**body, "temperature": 0,
                               "stream": stream}, timeout=120)
                assert r.status_code == 200, (path, stream, r.text)
        # a prompt that leaves a few tokens: the answer gets exactly those
        words = "word " * 234
        r = http.post(f"{small.url}/v1/completions", json={"prompt": words, "temperature": 0},
                       timeout=120)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert 0 < usage["completion_tokens"] < 30 and usage["total_tokens"] == SMALL_CTX
        assert r.json()["choices"][0]["finish_reason"] == "length"
        r = http.post(f"{small.url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "word " * 200 + "Say something."}]})
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= SMALL_CTX, r.text
        # an explicit budget is the client's: refused when it cannot fit
        err = _error(http.post(f"{small.url}/v1/chat/completions", timeout=60, json={
            "messages": MSG, "max_tokens": SMALL_CTX + 1}), 400)
        assert err["param"] == "max_tokens"
        err = _error(http.post(f"{small.url}/v1/completions", timeout=60, json={
            "prompt": words, "max_tokens": 100}), 400)
        assert err["type"] == "exceed_context_size_error"


# -- every bad input is a 4xx ------------------------------------------------------

# the documented limits on stop strings (docs/server.md): at most 16, of at most 256 characters each
MAX_STOPS, MAX_STOP_CHARS = 16, 256
SURROGATE = "\ud800"  # a lone surrogate: valid JSON (as an escape), not valid Unicode text
SURROGATE_BODIES = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a" + SURROGATE}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": SURROGATE},
                                           {"role": "user", "content": "Hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi",
                                            "name": SURROGATE}]}),
    ("/v1/chat/completions", {"messages": MSG, "stop": [SURROGATE]}),
    ("/v1/chat/completions", {"messages": MSG, "model": SURROGATE}),
    ("/v1/chat/completions", {"messages": MSG, SURROGATE: 1}),
    ("/v1/completions", {"prompt": SURROGATE}),
    ("/v1/completions", {"prompt": ["x" + SURROGATE]}),
    ("/v1/completions", {"prompt": "x", "stop": SURROGATE}),
    ("/answer", {"question": SURROGATE}),
    ("/answer", {"question": "q", "context": "c" + SURROGATE}),
    ("/answer", {"question": "q", SURROGATE: 1}),
]


@pytest.mark.parametrize("path,body", SURROGATE_BODIES,
                         ids=[f"{p}-{i}" for i, (p, _) in enumerate(SURROGATE_BODIES)])
@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_is_400_naming_the_field(server: Running, path: str, body: dict,
                                                  stream: bool) -> None:
    raw = json.dumps({**body, "max_tokens": 2, "stream": stream}).encode()
    assert b"\\ud800" in raw  # sent as the JSON escape, as a client's json.dumps sends it
    err = _error(http.post(f"{server.url}{path}", content=raw, timeout=60,
                            headers={"content-type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] and "surrogate" in err["message"]


@pytest.mark.parametrize("raw", [b'{"question": "\xed\xa0\x80"}',  # a surrogate as UTF-8 bytes
                                 b'{"question": "\xff"}',
                                 '{"question": "q"}'.encode("utf-16")])
def test_a_body_that_is_not_utf8_is_400(server: Running, raw: bytes) -> None:
    err = _error(http.post(f"{server.url}/answer", content=raw, timeout=60,
                            headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/answer"])
@pytest.mark.parametrize("raw", [b"[" * 5000, b"{\"a\":" * 5000, b'{"messages": ' + b"[" * 20_000])
def test_deep_nesting_is_400(server: Running, path: str, raw: bytes) -> None:
    err = _error(http.post(f"{server.url}{path}", content=raw, timeout=60,
                            headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json" and "nest" in err["message"]


@pytest.mark.parametrize("path,base", [("/v1/chat/completions", {"messages": MSG}),
                                       ("/v1/completions", {"prompt": "Hi"})])
@pytest.mark.parametrize("stop", [["s"] * (MAX_STOPS + 1), ["x" * (MAX_STOP_CHARS + 1)],
                                  "x" * (MAX_STOP_CHARS + 1), ["ok", 5]])
def test_stop_strings_over_the_limits_are_400_naming_stop(server: Running, path: str,
                                                          base: dict, stop: object) -> None:
    r = http.post(f"{server.url}{path}", json={**base, "stop": stop, "max_tokens": 2},
                   timeout=60)
    assert _error(r, 400)["param"] == "stop"


def test_stop_strings_at_the_limits_are_accepted(server: Running) -> None:
    stops = [chr(0x4e00 + i) * MAX_STOP_CHARS for i in range(MAX_STOPS)]
    r = http.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"messages": MSG, "stop": stops, "max_tokens": 2})
    assert r.status_code == 200, r.text


def _requests_total(server: Running, route: str, status: int) -> float:
    text = http.get(f"{server.url}/metrics", timeout=10).text
    return _samples(text).get(f'ggufllm_requests_total{{route="{route}",status="{status}"}}', 0.0)


def test_an_unexpected_500_is_counted_and_in_openai_shape(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    def broken() -> dict:
        raise RuntimeError("injected fault")

    # a server of its own: the module's server must never count a 5xx (test_errors_never_5xx)
    with running_server() as own:
        assert _requests_total(own, "/v1/models", 500) == 0
        monkeypatch.setattr(own.service, "get_model_info", broken)
        err = _error(http.get(f"{own.url}/v1/models", timeout=10), 500)
        assert err["type"] == "server_error" and "injected" not in err["message"]
        monkeypatch.undo()
        assert _requests_total(own, "/v1/models", 500) == 1


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_client_that_leaves_mid_upload_is_not_an_error(server: Running) -> None:
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("ggufllm", "uvicorn", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        host, port = server.url.removeprefix("http://").split(":")
        for path in ("/v1/chat/completions", "/answer"):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                             "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                             '{"messages": [{"role": "user", "content": "'.encode())
                time.sleep(0.2)  # the route is waiting for the rest of the body
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not records.records:
            time.sleep(0.05)
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    errors = [r.getMessage() for r in records.records if r.levelno >= logging.WARNING]
    assert not errors
    assert http.get(f"{server.url}/health", timeout=10).status_code == 200


# -- helpers -------------------------------------------------------------------


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "code", "param"}
    assert "Traceback" not in r.text
    return body["error"]  # type: ignore[no-any-return]


def _sse(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# -- the bench client ------------------------------------------------------------


def test_bench_reports_every_level_against_one_at_a_time(server: Running) -> None:
    from ggufllm.server.bench import BenchOptions, parse_levels, percentile, run_bench

    assert parse_levels("1, 4,8") == (1, 4, 8)
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 95) == 4.0
    lines = list(run_bench(server.url, BenchOptions(levels=(2,), n_requests=2, max_tokens=2)))
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["1", "2"]  # one at a time is always measured
    for r in rows:
        assert float(r[1]) > 0 and int(r[5]) >= 2
    assert rows[0][2] == "1.00"
