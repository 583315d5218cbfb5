"""SIGTERM drains: new requests get 503, running ones finish, what outlives the drain ends
with the ``shutting_down`` error; a second signal stops at once. A real ``ggufllm serve``
(on the default model; the requests that run through a whole drain on the tiny gpt-oss
fixture, ``tiny_path``: random weights whose greedy answer to COUNT runs to its length here,
decoded ~6 times cheaper)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ggufllm.server.bench import free_port

from . import http_calls as http
from .server_fixture import wait_health

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
COUNT = {"prompt": "1, 2, 3, 4, 5, 6,", "temperature": 0}
TOKENS = 300  # each of the two requests the drain lets finish (~1 s after the signal)


def _serve(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GGUFLLM_")}
    proc = subprocess.Popen([sys.executable, "-m", "ggufllm.cli", "serve", "--port", str(port),
                             "--ctx", "2048", *args], env={**env, "PYTHONPATH": str(ROOT)},
                            cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_health(url, 200, timeout_s=180, proc=proc)
    return proc, url


def _in_flight(url: str) -> float:
    text = http.get(f"{url}/metrics", timeout=30).text
    return float(re.search(r"^ggufllm_requests_in_flight (\S+)$", text, re.M).group(1))


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """The server ended by itself: uvicorn raises the signal it caught again once it has
    shut down, so the exit status says SIGTERM (as a process without handlers would)."""
    return proc.wait(timeout=60) in (0, -signal.SIGTERM)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _stream_events(url: str, max_tokens: int, started: threading.Event,
                   out: list[dict[str, Any]]) -> None:
    """A streamed completion; every event lands in ``out``; ``started`` is set at the first
    token."""
    body = {**COUNT, "max_tokens": max_tokens, "stream": True}
    with http.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                out.append({"done": True})
            elif line.startswith("data: {"):
                out.append(json.loads(line[6:]))
                started.set()


def test_sigterm_lets_running_requests_finish_and_refuses_new_ones(tiny_path) -> None:
    proc, url = _serve("--drain-timeout", "300", "--model", str(tiny_path))
    try:
        events: list[dict[str, Any]] = []
        started = threading.Event()
        # long enough to outlast the refusal and health checks below (~10 ms) many times over
        stream = threading.Thread(target=_stream_events, args=(url, TOKENS, started, events))
        whole: dict[str, Any] = {}

        def non_streamed() -> None:
            r = http.post(f"{url}/v1/completions", json={**COUNT, "max_tokens": TOKENS},
                           timeout=120)
            whole.update(status=r.status_code, body=r.json())

        plain = threading.Thread(target=non_streamed)
        stream.start()
        plain.start()
        assert started.wait(120)
        deadline = time.monotonic() + 60
        while _in_flight(url) < 2:  # both are running when the signal comes
            assert time.monotonic() < deadline and plain.is_alive()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        # draining: new work is refused with a retry hint, health says so, the port still answers
        deadline = time.monotonic() + 10
        while True:
            r = http.post(f"{url}/v1/completions", json={**COUNT, "max_tokens": 2}, timeout=30)
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "shutting_down"
        assert int(r.headers["Retry-After"]) > 0
        health = http.get(f"{url}/health", timeout=30)
        assert (health.status_code, health.json()["status"]) == (503, "draining")
        # what was running when the signal came finishes as if nothing happened
        stream.join(120)
        plain.join(120)
        assert not stream.is_alive() and not plain.is_alive()
        assert events[-1] == {"done": True}
        assert not any("error" in e for e in events), events[-3:]
        finals = [c["finish_reason"] for e in events[:-1] for c in e.get("choices", [])
                  if c.get("finish_reason")]
        # ended as answers end (the drain cut neither): at their length here, or at an end
        # token a random-weight model may draw on another CPU's kernels
        assert finals in (["length"], ["stop"]), events[-3:]
        assert whole["status"] == 200, whole
        ended = whole["body"]["choices"][0]["finish_reason"]
        generated = whole["body"]["usage"]["completion_tokens"]
        assert ended in ("length", "stop") and 0 < generated <= TOKENS, whole
        assert (ended == "length") == (generated == TOKENS), whole
        # then the server stops by itself, long before the drain timeout
        assert _exited(proc)
    finally:
        _stop(proc)


def _long_stream(url: str) -> tuple[threading.Thread, list[dict[str, Any]]]:
    """A 1900-token stream, once its first token arrived: (its thread, its events)."""
    events: list[dict[str, Any]] = []
    started = threading.Event()
    stream = threading.Thread(target=_stream_events, args=(url, 1900, started, events))
    stream.start()
    assert started.wait(120)
    return stream, events


def test_what_outlives_the_drain_ends_with_shutting_down() -> None:
    proc, url = _serve("--drain-timeout", "1")
    try:
        stream, events = _long_stream(url)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stream.join(60)
        took = time.monotonic() - t0
        assert not stream.is_alive()
        assert events[-1] == {"done": True}
        assert events[-2]["error"]["code"] == "shutting_down", events[-3:]
        assert 0.9 <= took < 30, took  # the drain waited its second, not the 1900 tokens
        assert _exited(proc)
    finally:
        _stop(proc)


def test_a_second_signal_stops_without_waiting_for_the_drain() -> None:
    proc, url = _serve("--drain-timeout", "300")
    try:
        stream, events = _long_stream(url)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stream.join(60)
        assert not stream.is_alive() and time.monotonic() - t0 < 30
        assert events[-2]["error"]["code"] == "shutting_down", events[-3:]
        assert _exited(proc)
    finally:
        _stop(proc)


def test_drain_timeout_is_validated() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GGUFLLM_")}
    r = subprocess.run([sys.executable, "-m", "ggufllm.cli", "serve", "--port", "0"],
                       env={**env, "PYTHONPATH": str(ROOT), "GGUFLLM_DRAIN_TIMEOUT_S": "-1"},
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "GGUFLLM_DRAIN_TIMEOUT_S" in r.stderr, r.stderr[-500:]
