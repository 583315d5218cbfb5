"""Loading, failing to load, the API key, SIGTERM, and ``uvicorn ggufllm.server:app``."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from ggufllm import LLMService
from ggufllm.server import ServerConfig
from ggufllm.server.bench import free_port

from . import http_calls as http
from .server_fixture import running_server, wait_health

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MSG = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


def test_health_is_503_while_loading_then_200(default_gguf: Path) -> None:
    release = threading.Event()

    def progress(fraction: float) -> bool:
        release.wait(60)  # holds the load until the test has seen the 503s
        return True

    service = LLMService(default_gguf, max_length=1024, progress=progress)
    try:
        with running_server(service, wait=False) as server:
            r = http.get(f"{server.url}/health", timeout=10)
            assert (r.status_code, r.json()) == (503, {"status": "loading"})
            busy = http.post(f"{server.url}/v1/chat/completions", json=MSG, timeout=10)
            assert busy.status_code == 503 and busy.headers["retry-after"]
            assert busy.json()["error"]["code"] == "model_loading"
            assert http.get(f"{server.url}/v1/models", timeout=10).json()["data"] == []
            release.set()
            assert wait_health(server.url, 200).json() == {"status": "ok"}
            ok = http.post(f"{server.url}/v1/chat/completions", json=MSG, timeout=120)
            assert ok.status_code == 200
        assert not service.is_loaded  # the server's shutdown freed the model
    finally:
        release.set()


def test_health_is_500_with_the_reason_when_the_model_is_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with running_server(LLMService(bad), wait=False) as server:
        r = wait_health(server.url, 500)
        assert r.json()["status"] == "error" and "broken.gguf" in r.json()["error"]
        chat = http.post(f"{server.url}/v1/chat/completions", json=MSG, timeout=10)
        assert chat.status_code == 500
        assert chat.json()["error"]["code"] == "model_load_failed"


ROUTES = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
          ("POST", "/answer"), ("GET", "/metrics"), ("GET", "/openapi.json"),
          ("GET", "/v1/nothing"), ("GET", "/")]


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_api_key_is_required_on_every_route_but_health() -> None:
    key = "s3cret-key"
    with running_server(config=ServerConfig(api_key=key)) as server:
        def call(method: str, path: str, headers: dict[str, str]) -> httpx.Response:
            body = {"/v1/completions": {"prompt": "Hi", "max_tokens": 2},
                    "/answer": {"question": "Hi", "max_tokens": 2}}.get(path, {**MSG,
                                                                           "max_tokens": 2})
            return http.request(method, f"{server.url}{path}", headers=headers,
                                 json=body if method == "POST" else None, timeout=120)

        for method, path in ROUTES:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key},
                            {"X-Api-Key": "s3cret-ke"}, {"Authorization": f"Basic {key}"},
                            {"Authorization": _basic("user", "wrong")},
                            {"Authorization": _basic(key, "")}):
                r = call(method, path, headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "authentication_error"
                # the page makes a browser ask for the key; API routes ask for a bearer
                assert r.headers["www-authenticate"].split()[0] == (
                    "Basic" if path == "/" else "Bearer")
            for headers in ({"Authorization": f"Bearer {key}"}, {"authorization": f"bearer {key}"},
                            {"X-Api-Key": key}, {"Authorization": _basic("anyone", key)},
                            {"Authorization": _basic("", key)}):
                # let in, and answered as without a key: the route's own answer, never an error
                r = call(method, path, headers)
                assert r.status_code == (404 if path == "/v1/nothing" else 200), (
                    path, headers, r.status_code, r.text[:200])
        assert http.get(f"{server.url}/health", timeout=10).status_code == 200
        page = http.get(f"{server.url}/", auth=("me", key), timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()


def _port_is_free(port: int) -> bool:
    """Whether a new server can listen on ``port`` (SO_REUSEADDR, as uvicorn sets it: the
    closed connections' TIME_WAIT entries do not count, a socket still listening does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _env() -> dict[str, str]:
    # no key from the caller's shell (an empty GGUFLLM_API_KEY is an error, not "no key")
    env = {k: v for k, v in os.environ.items() if k != "GGUFLLM_API_KEY"}
    return {**env, "PYTHONPATH": str(ROOT)}


def _sigterm_during_a_stream(proc: subprocess.Popen[bytes], url: str, port: int) -> None:
    wait_health(url, 200, timeout_s=180, proc=proc)
    body = {"question": "List the first fifty prime numbers.", "max_tokens": 500, "temperature": 0,
            "stream": True}
    lines: list[str] = []
    with http.stream("POST", f"{url}/answer", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 4:
                proc.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
    assert time.monotonic() - t0 < 30, "the stream did not end after SIGTERM"
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert events[-1]["error"]["code"] == "shutting_down"
    assert lines[-1] == "data: [DONE]"
    proc.wait(timeout=60)
    assert _port_is_free(port)


def test_serve_ends_streams_frees_and_releases_the_port_on_sigterm() -> None:
    port = free_port()
    # no drain: the stream ends at once (tests/test_server_drain.py holds the drain)
    proc = subprocess.Popen([sys.executable, "-m", "ggufllm.cli", "serve", "--port", str(port),
                             "--ctx", "1024", "--drain-timeout", "0"], env=_env(), cwd=ROOT)
    try:
        _sigterm_during_a_stream(proc, f"http://127.0.0.1:{port}", port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_uvicorn_app_reads_the_model_from_the_environment(default_gguf: Path) -> None:
    port = free_port()
    env = {**_env(), "LLM_MODEL_PATH": str(default_gguf), "MAX_LENGTH": "1024",
           "GGUFLLM_DRAIN_TIMEOUT_S": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "ggufllm.server:app", "--port",
                             str(port), "--log-level", "warning"], env=env, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, 200, timeout_s=180, proc=proc)
        models = http.get(f"{url}/v1/models", timeout=10).json()["data"]
        assert models[0]["id"] == default_gguf.stem
        _sigterm_during_a_stream(proc, url, port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_readme_openai_example_runs() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme.split("## HTTP server", 1)[1].split("\n## ", 1)[0]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "OpenAI(" in block
    code = block.replace("8011", str(free_port()))
    done = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.splitlines()[:2]
    assert first.strip() and second.strip()
