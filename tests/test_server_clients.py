"""Clients the server must survive: one that stops reading a stream, and users sharing one key
who must not learn from ``cached_tokens`` what others asked. A real server on the tiny gpt-oss
fixture (``tiny_path``: random weights, the real o200k_harmony tokenizer; decoding ~6 times
and a prompt ~20 times cheaper than the default model's). Its greedy answer to COUNT runs to
the full 1900 tokens, so only a dropped generation ends short."""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest

from ggufllm import LLMService
from ggufllm.server import ServerConfig

from . import http_calls as http
from .server_fixture import running_server

pytestmark = pytest.mark.slow

COUNT = {"prompt": "1, 2, 3, 4, 5, 6,", "temperature": 0}


def _gauge(url: str, name: str) -> float:
    text = http.get(f"{url}/metrics", timeout=30).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, name
    return float(match.group(1))


def _raw_request(url: str, path: str, body: bytes) -> socket.socket:
    """Sends a request on a socket with a tiny receive buffer and never reads the answer."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    return sock


def test_a_client_that_stops_reading_is_dropped_and_frees_its_slot(tiny_path) -> None:
    # every event repeats the model id: a long one fills the buffers in fewer tokens
    config = ServerConfig(api_key=None, write_timeout_s=1.0, model_alias="m" * 256)
    # small kernel buffers on both ends, as over a slow network: the answer outgrows them,
    # and uvicorn's own write buffer (64 KiB), within a few hundred tokens
    service = LLMService(tiny_path, n_parallel=1, max_length=2048)
    with running_server(service, config=config, sndbuf=4096) as server:
        body = httpx.Request("POST", "/", json={**COUNT, "max_tokens": 1900,
                                                 "stream": True}).content
        sock = _raw_request(server.url, "/v1/completions", body)
        try:
            # once the buffers are full the write waits; after the write timeout the
            # generation is cancelled
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if _gauge(server.url, "ggufllm_requests_in_flight") == 0:
                    break
                time.sleep(0.2)
            assert _gauge(server.url, "ggufllm_requests_in_flight") == 0, (
                "the generation of a client that stopped reading was never dropped")
            # it did not run to its 1900 tokens: the only slot is free for the next client
            r = http.post(f"{server.url}/v1/completions", json={**COUNT, "max_tokens": 4},
                           timeout=60)
            assert r.status_code == 200
            generated = _gauge(server.url, "ggufllm_generated_tokens_total")
            assert generated < 1900, generated
        finally:
            sock.close()


@pytest.mark.parametrize("report", [True, False])
def test_cached_tokens_can_be_hidden_from_clients(tiny_path, report: bool) -> None:
    config = ServerConfig(api_key=None, report_cached_tokens=report)
    body = {"prompt": "The sky is blue and the grass is green. " * 20, "max_tokens": 2,
            "temperature": 0}
    with running_server(LLMService(tiny_path, max_length=1024), config=config) as server:
        http.post(f"{server.url}/v1/completions", json=body, timeout=60).raise_for_status()
        again = http.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert (cached > 0) is report, again["usage"]
        # the operator's own figure still counts the hit
        hits = _gauge(server.url, "ggufllm_prompt_tokens_cached_total")
        assert hits > 0
