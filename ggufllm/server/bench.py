"""``ggufllm bench``: the same streamed requests one at a time and at each concurrency.

Speaks plain OpenAI HTTP (``/v1/completions`` or ``/v1/chat/completions``,
``stream: true``, greedy), so it measures ggufllm and llama-server alike. Per
level it reports aggregate generated tokens/s (all tokens / wall time) and the
p50/p95 time to first token, and the speed-up against concurrency 1.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import InvalidParameterError

__all__ = ["BenchOptions", "RequestResult", "LevelResult", "parse_levels", "run_bench",
           "run_level", "percentile", "free_port", "wait_ready"]

_TOPICS = ["the moon", "rivers", "bread", "volcanoes", "the ocean", "bicycles", "libraries",
           "winter", "bees", "mountains", "trains", "coffee", "the desert", "music", "forests",
           "clocks"]


@dataclass(frozen=True)
class BenchOptions:
    levels: tuple[int, ...] = (1, 4, 8)
    n_requests: int = 16
    max_tokens: int = 64
    api_key: str | None = None
    endpoint: str = "completions"


@dataclass(frozen=True)
class RequestResult:
    ttft_s: float
    total_s: float
    n_tokens: int


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    wall_s: float
    results: tuple[RequestResult, ...]

    @property
    def tokens(self) -> int:
        return sum(r.n_tokens for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def parse_levels(text: str) -> tuple[int, ...]:
    """``"1,4,8"`` -> ``(1, 4, 8)``.

    Raises:
        InvalidParameterError: not a list of positive integers.
    """
    try:
        levels = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        levels = ()
    if not levels or any(n < 1 or n > 1024 for n in levels):
        raise InvalidParameterError(f"--concurrency wants numbers 1..1024 like 1,4,8 (got "
                                    f"{text!r})", "concurrency")
    return levels


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _payload(i: int, options: BenchOptions, model: str | None) -> dict[str, Any]:
    text = f"Tell me about {_TOPICS[i % len(_TOPICS)]}."
    body: dict[str, Any] = {"max_tokens": options.max_tokens, "temperature": 0.0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    if options.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


def _one(url: str, body: dict[str, Any], options: BenchOptions) -> RequestResult:
    """One streamed request; TTFT is the first event that carries text."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=600)
    path = "/v1/chat/completions" if options.endpoint == "chat" else "/v1/completions"
    headers = {"Content-Type": "application/json"}
    if options.api_key:
        headers["Authorization"] = f"Bearer {options.api_key}"
    t0 = time.perf_counter()
    conn.request("POST", path, json.dumps(body), headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft: float | None = None
    n_events = 0
    n_usage: int | None = None
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            text = choice.get("text") or delta.get("content") or delta.get("reasoning_content")
            if text:
                n_events += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            n_usage = int(usage["completion_tokens"])
    total = time.perf_counter() - t0
    conn.close()
    return RequestResult(ttft if ttft is not None else total, total,
                         n_usage if n_usage is not None else n_events)


def run_level(url: str, concurrency: int, options: BenchOptions,
              model: str | None) -> LevelResult:
    """Sends ``n_requests`` requests with ``concurrency`` of them in flight at a time."""
    bodies = [_payload(i, options, model) for i in range(options.n_requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda b: _one(url, b, options), bodies))
    return LevelResult(concurrency, time.perf_counter() - t0, tuple(results))


def _get_json(url: str, path: str, api_key: str | None) -> tuple[int, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body else None
    except (OSError, ValueError):
        return 0, None
    finally:
        conn.close()


def wait_ready(url: str, timeout_s: float = 300.0) -> None:
    """Waits until ``GET /health`` answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _get_json(url, "/health", None)[0] == 200:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s")


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(model: str | None, parallel: int) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    cmd = [sys.executable, "-m", "ggufllm.cli", "serve", "--port", str(port),
           "--parallel", str(parallel)]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    return f"http://127.0.0.1:{port}", proc


def run_bench(url: str | None, options: BenchOptions, model: str | None = None) -> Iterator[str]:
    """Runs the benchmark and yields the report's lines.

    Args:
        url: a running server; None starts ``ggufllm serve`` (``--parallel`` = the highest
            level) on a free local port for the run.
        options: levels, requests, budget, key, endpoint.
        model: the model for the server started here.
    """
    proc = None
    if url is None:
        url, proc = _start_server(model, max(options.levels))
    try:
        wait_ready(url)
        _, listing = _get_json(url, "/v1/models", options.api_key)
        data = (listing or {}).get("data") or [{}]
        model_id = data[0].get("id")
        _one(url, _payload(0, options, model_id), options)  # warm-up
        yield (f"server {url}  model {model_id}  endpoint /v1/{options.endpoint}  "
               f"{options.n_requests} requests x {options.max_tokens} max tokens, greedy")
        yield f"{'clients':>7} {'tok/s':>8} {'x serial':>8} {'p50 TTFT':>9} {'p95 TTFT':>9} " \
              f"{'tokens':>7} {'wall s':>7}"
        serial = run_level(url, 1, options, model_id)
        levels = [serial] + [run_level(url, c, options, model_id)
                             for c in options.levels if c != 1]
        for level in sorted(levels, key=lambda r: r.concurrency):
            ttfts = [r.ttft_s for r in level.results]
            yield (f"{level.concurrency:>7} {level.tokens_per_s:>8.1f} "
                   f"{level.tokens_per_s / max(serial.tokens_per_s, 1e-9):>8.2f} "
                   f"{percentile(ttfts, 50):>8.3f}s {percentile(ttfts, 95):>8.3f}s "
                   f"{level.tokens:>7} {level.wall_s:>7.1f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


