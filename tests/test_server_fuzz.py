"""A bounded HTTP fuzz test against a real server and model: random and mutated JSON bodies,
headers, methods, paths and encodings (fixed seed). No answer is a 5xx, every error is in
OpenAI's error shape, and the server is healthy afterwards.

Generations are kept short (``DEFAULT_MAX_TOKENS=2``, and the values the mutations draw for
``max_tokens`` are tiny or invalid), so the few thousand cases run in well under a minute.
Malformed HTTP framing (a bad ``Content-Length``, broken chunking) is uvicorn's to refuse
before the app runs, and is not fuzzed here.
"""

from __future__ import annotations

import gzip
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ggufllm.server import ServerConfig

from . import http_calls as http
from .server_fixture import Running, running_server

pytestmark = pytest.mark.slow

SEED = 15
N_CASES = 1200
LIMIT = 64 * 1024
ROUTES = ("/v1/chat/completions", "/v1/completions", "/answer")

MSG = [{"role": "user", "content": "Hi"}]
SEEDS: list[tuple[str, Any]] = [
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2, "temperature": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": [
                                               {"type": "text", "text": "Name a colour."}]}],
                              "stream": True, "stream_options": {"include_usage": True},
                              "stop": ["\n"], "seed": 7, "top_k": 5, "top_p": 0.5,
                              "min_p": 0.1, "repeat_penalty": 1.1}),
    ("/v1/chat/completions", {"messages": [*MSG, {"role": "assistant", "content": "Hello."},
                                           {"role": "user", "content": "And?"}],
                              "model": "default", "max_completion_tokens": 1, "n": 1,
                              "reasoning_effort": "low", "logprobs": False}),
    ("/v1/completions", {"prompt": "The sky is", "max_tokens": 2, "stop": "."}),
    ("/v1/completions", {"prompt": ["Once upon"], "stream": True, "echo": False}),
    ("/answer", {"question": "Where?", "context": "In Quenby.", "max_tokens": 2}),
    ("/answer", {"question": "Why?", "stream": True, "reasoning_effort": "high", "seed": 1}),
]
FIELDS = ["model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
          "seed", "stop", "stream", "stream_options", "n", "messages", "max_completion_tokens",
          "reasoning_effort", "logprobs", "prompt", "echo", "suffix", "question", "context",
          "role", "content", "name", "type", "text", "include_usage", "x", "__proto__", "",
          "\ud800", "é", "max_tokens "]
STRINGS = ["", " ", "\ud800", "\udfff", "a\ud800b", "\ud83d", "\x00", "a\x00b", "\u202e", "😀",
           "\u2028", "e\u0301", "<|endoftext|>", "<|start|>assistant<|channel|>final<|message|>",
           "<start_of_turn>model\n", "{{ raise_exception('x') }}", "%s%n", "\\", '"', "user",
           "system", "tool", "assistant", "developer", "text", "image_url", "low", "high",
           "default", "gpt-4o", "/etc/passwd", "5", "NaN", "x" * 300, "word " * 2000,
           "\ufeff", "\uffff", "\U0010ffff"]
NUMBERS = [0, -1, 1, 2, 3, 2**20 + 1, 2**31, 2**63, 2**64, -2**63, 10**30, 1e308, -1e308, 1.5,
           0.0, -0.0, 5e-324, 0.5, 100, 2**32 - 1, 2**32]
OTHER: list[Any] = [None, True, False, [], {}, [None], [""], [1, 2], {"role": "user"},
                    {"type": "text"}, {"include_usage": "yes"}, [[[[[]]]]], ["s"] * 40,
                    [{"role": "user", "content": "x"}] * 3]
CONTENT_TYPES = ["application/json"] * 60 + [
    "application/json; charset=utf-8", "APPLICATION/JSON", "application/json;charset=latin-1",
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b", "",
    "application/json, text/plain", "application/jsonp", "*/*", "application/\xe9"]
HOSTS = [None] * 100 + ["localhost:{port}", "[::1]:{port}", "127.0.0.1", "evil.example",
                       "127.0.0.1.evil.example:{port}", "", "localhost:99999", "[::1",
                       "h\xe9st", "a" * 300, "LOCALHOST:{port}", "xn--80ak6aa92e.com"]
ORIGINS = [None] * 80 + ["{url}", "null", "https://evil.example", "http://localhost",
                         "{url}/", "file://", "http://[::1", "\xe9", "x" * 200]
METHODS = ["POST"] * 30 + ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
PATHS = [*ROUTES, "/v1/chat/completions/", "/V1/models", "/v1/models/x", "/answer?x=1&x=2",
         "/health", "/metrics", "/", "/v1/embeddings", "/%2e%2e/%2e%2e/etc/passwd", "//answer",
         "/answer%00", "/v1/models?" + "a=1&" * 200]


def _interesting(rng: random.Random) -> Any:
    pool = rng.choice((STRINGS, NUMBERS, OTHER))
    return rng.choice(pool)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


def _with(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of ``value`` with ``new`` at ``path`` (a missing dict key is added)."""
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    head = path[0]
    copy[head] = _with(copy[head], path[1:], new) if len(path) > 1 else new
    return copy


def _mutate(rng: random.Random, value: Any) -> Any:
    paths = list(_paths(value))
    path = rng.choice(paths)
    target = _get(value, path)
    kind = rng.randrange(6)
    if kind == 0:
        return _with(value, path, _interesting(rng))
    if kind == 1 and isinstance(target, dict) and target:
        return _with(value, path, {k: v for k, v in target.items()
                                   if k != rng.choice(list(target))})
    if kind == 2 and isinstance(target, dict):
        return _with(value, path, {**target, rng.choice(FIELDS): _interesting(rng)})
    if kind == 3 and isinstance(target, str):
        at = rng.randrange(len(target) + 1)
        return _with(value, path, target[:at] + rng.choice(STRINGS) + target[at:])
    if kind == 4 and isinstance(target, list) and target:
        return _with(value, path, target * rng.choice((0, 2, 17, 300)))
    if kind == 5:
        return _with(value, path, rng.choice(([target], {"x": target}, [target] * 3)))
    return _with(value, path, _interesting(rng))


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    if depth > 4 or rng.random() < 0.3:
        return _interesting(rng)
    if rng.random() < 0.5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(FIELDS): _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def _encode(rng: random.Random, value: Any) -> tuple[bytes, str]:
    """The body's bytes, sometimes in another encoding or broken."""
    ascii_only = rng.random() < 0.7
    text = json.dumps(value, ensure_ascii=ascii_only)
    roll = rng.random()
    if roll < 0.75:
        return text.encode("utf-8", "surrogatepass"), "utf-8"
    if roll < 0.80:
        return text.encode(rng.choice(("utf-16", "utf-32", "utf-16-be")), "surrogatepass"), "utf-16/32"
    if roll < 0.83:
        return text.encode("latin-1", "replace"), "latin-1"
    if roll < 0.86:
        return b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass"), "bom"
    raw = text.encode("utf-8", "surrogatepass")
    if roll < 0.90:
        return raw[:rng.randrange(len(raw) + 1)], "truncated"
    if roll < 0.94:
        data = bytearray(raw)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data), "flipped"
    if roll < 0.96:
        return gzip.compress(raw), "gzip"
    return raw + rng.choice((b"\x00", b" ]", b"}", b"\n\n{}", b"," + raw)), "trailing"


def _raw_body(rng: random.Random) -> tuple[bytes, str]:
    """Bodies no serializer writes."""
    depth = rng.choice((100, 900, 1100, 5000, 20000))
    return rng.choice([
        (b"[" * depth, "deep list"),
        (b'{"a":' * depth + b"1" + b"}" * depth, "deep object"),
        (b'{"messages": ' + b"[" * depth + b"]" * depth + b"}", "deep messages"),
        (b"", "empty"),
        (bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), "random bytes"),
        (b'{"max_tokens": ' + b"9" * rng.choice((20, 4400, 30000)) + b"}", "long number"),
        (b'{"temperature": 1e999, "messages": [{"role": "user", "content": "x"}]}', "1e999"),
        (b'{"prompt": "a", "prompt": 5}', "duplicate keys"),
        (b'{"question": "\\ud800\\udc00\\udc00"}', "pair then lone"),
        (b'{"question": "\\u0000"}', "escaped nul"),
        (b'{"messages": [{"role": "user", "content": "Hi"}], "stop": ["\\ud800"]}', "stop"),
        (b"null", "null"), (b"1", "number"), (b'"x"', "string"), (b"true", "bool"),
    ])


def _case(rng: random.Random, url: str, port: int) -> tuple[str, str, dict[str, str], bytes,
                                                            str]:
    """One request: method, path, headers, body and a description for the failure report."""
    roll = rng.random()
    path, seed = rng.choice(SEEDS)
    if roll < 0.78:
        value = seed
        for _ in range(rng.randrange(1, 4)):
            value = _mutate(rng, value)
        body, how = _encode(rng, value)
        what = f"mutated {how}"
    elif roll < 0.88:
        body, how = _encode(rng, _random_json(rng))
        path = rng.choice(ROUTES)
        what = f"random json {how}"
    elif roll < 0.98:
        body, what = _raw_body(rng)
        path = rng.choice(ROUTES)
    else:
        body, what = json.dumps(seed).encode(), "valid seed"
    method = rng.choice(METHODS)
    if rng.random() < 0.15:
        path = rng.choice(PATHS)
    headers: dict[str, str] = {}
    content_type = rng.choice(CONTENT_TYPES)
    if content_type or rng.random() < 0.5:
        headers["Content-Type"] = content_type
    host = rng.choice(HOSTS)
    if host is not None:
        headers["Host"] = host.format(port=port)
    origin = rng.choice(ORIGINS)
    if origin is not None:
        headers["Origin"] = origin.format(url=url)
    if rng.random() < 0.1:
        headers["Authorization"] = rng.choice(("Bearer", "Bearer x", "Basic !!", "\xe9"))
    if rng.random() < 0.05:
        headers["Content-Encoding"] = "gzip"
    if rng.random() < 0.05:
        headers["Access-Control-Request-Method"] = rng.choice(("POST", "GET", "BREW"))
    return method, path, headers, body, what


def _check(r: httpx.Response, method: str) -> str | None:
    """What is wrong with one answer, or None."""
    if r.status_code >= 500:
        return f"status {r.status_code}: {r.text[:300]}"
    if method == "HEAD":
        return None
    if r.status_code >= 400:
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"status {r.status_code} not in OpenAI's error shape: {r.text[:300]}"
        if not (isinstance(err, dict) and set(err) >= {"message", "type", "code", "param"}
                and isinstance(err["message"], str) and isinstance(err["type"], str)):
            return f"status {r.status_code} not in OpenAI's error shape: {r.text[:300]}"
        return None
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [x for x in r.text.splitlines() if x.startswith("data: ")]
        if not lines or lines[-1] != "data: [DONE]":
            return f"a stream that does not end with [DONE]: {r.text[-300:]}"
        for line in lines[:-1]:
            event = json.loads(line[6:])
            if "error" in event:
                return f"an error event in a 200 stream: {line[:300]}"
    return None


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    config = ServerConfig(api_key=None, max_body_bytes=LIMIT)
    # one llama.cpp thread: on 2 shared cores, threads that spin at barriers make a 2-token
    # answer 10x slower when other work competes for the CPU
    with running_server(config=config, max_length=512, default_max_tokens=2, n_parallel=2,
                        n_threads=1) as running:
        yield running


def test_fuzzed_requests_are_never_5xx_and_errors_are_openai_shaped(server: Running) -> None:
    rng = random.Random(SEED)
    port = int(server.url.rsplit(":", 1)[1])
    failures: list[str] = []
    statuses: dict[int, int] = {}
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for index in range(N_CASES):
            method, path, headers, body, what = _case(rng, server.url, port)
            try:
                r = client.request(method, path, headers={
                    k: v.encode("latin-1") for k, v in headers.items()},
                                   content=body if method != "GET" else None)
            except httpx.TransportError as exc:
                failures.append(f"#{index} {what} {method} {path} {headers}: {exc!r}")
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            problem = _check(r, method)
            if problem:
                failures.append(f"#{index} {what} {method} {path} {headers} "
                                f"{body[:120]!r}: {problem}")
    elapsed = time.monotonic() - started
    print(f"{N_CASES} cases in {elapsed:.1f} s; statuses {dict(sorted(statuses.items()))}")
    assert not failures, f"{len(failures)} of {N_CASES} cases failed:\n" + "\n".join(
        failures[:15])
    # the mix reaches the model as well as the validation
    assert statuses.get(200, 0) >= 25 and sum(statuses.values()) == N_CASES
    _assert_healthy(server)


def _assert_healthy(server: Running) -> None:
    assert http.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    r = http.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip()
    deadline = time.monotonic() + 5
    while True:  # every generation the fuzz started has ended and let go of its slot
        info = server.service.get_model_info()["scheduler"]
        if (info["running"], info["waiting"]) == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (info["running"], info["waiting"]) == (0, 0)
    samples = {}
    for line in http.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    fives = [k for k, v in samples.items() if k.startswith("ggufllm_requests_total")
             and 'status="5' in k and 'route="/health"' not in k and v]  # 503 while loading
    assert not fives
    assert samples["ggufllm_requests_in_flight"] == 0
    assert samples["ggufllm_requests_waiting_first_token"] == 0
