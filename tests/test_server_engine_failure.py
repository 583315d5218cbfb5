"""An engine failure over HTTP: an error, never a cut answer; health tells; the model reloads."""

from __future__ import annotations

import json
import threading
import time

import pytest

from ggufllm.engine.stepper import Stepper

from . import http_calls as http
from .server_fixture import running_server, wait_health

CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0}


def _boom(*_args, **_kwargs):
    raise MemoryError("injected")


def _admit_boom(self: Stepper) -> None:
    if self._waiting:
        raise MemoryError("injected")


def _failures(url: str) -> float:
    text = http.get(f"{url}/metrics", timeout=10).text
    lines = [ln for ln in text.splitlines() if ln.startswith("ggufllm_engine_failures_total")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_a_stream_ends_with_an_error_event_and_a_request_gets_503_then_health_recovers():
    with running_server(max_length=512, n_parallel=2) as server:
        url, svc = server.url, server.service
        assert _failures(url) == 0
        events: list[dict] = []
        started = threading.Event()

        def stream() -> None:
            # a raw continuation without stop strings: still generating when the engine fails
            with http.stream("POST", f"{url}/v1/completions", timeout=120,
                              json={"prompt": "Count to a thousand: 1, 2, 3,", "stream": True,
                                    "max_tokens": 400, "temperature": 0}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        assert reader.is_alive()
        svc._engine.slots.place = _boom  # the next admission kills the scheduler thread
        r = http.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 8}, timeout=60)
        reader.join(60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
        assert r.headers["Retry-After"]
        last = events[-1]
        assert "error" in last and last["error"]["code"] == "engine_failed"
        finishes = [c["finish_reason"] for e in events for c in e.get("choices", [])
                    if c.get("finish_reason")]
        assert finishes == []  # never a "stop" for a cut answer
        wait_health(url, 200, timeout_s=120)
        assert _failures(url) == 1
        ok = http.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 8}, timeout=60)
        assert ok.status_code == 200 and "Paris" in ok.json()["choices"][0]["message"]["content"]


def test_health_is_500_with_the_reason_once_reloads_gave_up(monkeypatch: pytest.MonkeyPatch):
    with running_server(max_length=512) as server:
        url, svc = server.url, server.service
        monkeypatch.setattr(Stepper, "_admit", _admit_boom)
        for i in range(4):
            r = http.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 4},
                           timeout=60)
            assert r.status_code in (500, 503), r.text
            deadline = time.monotonic() + 120
            while not (svc.health.failures == i + 1 and svc.health.state != "reloading"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        health = http.get(f"{url}/health", timeout=10)
        assert health.status_code == 500
        assert "MemoryError: injected" in health.json()["error"]
        r = http.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 4}, timeout=60)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_failed"
        assert _failures(url) == 4
