"""A web page must not drive the server: JSON-only POSTs, the Host check on loopback, the
Origin check, CORS, and an API key that cannot be empty. A real server, real model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ggufllm.errors import ConfigError
from ggufllm.server import ServerConfig
from ggufllm.server.bench import free_port
from ggufllm.server.config import load_server_config

from . import http_calls as http
from .server_fixture import Running, running_server, wait_health

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
KEY = "s3cret-key"
ALLOWED = "https://app.example"
FOREIGN = "https://evil.example"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODIES = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}],
                                   "max_tokens": 1, "temperature": 0},
          "/v1/completions": {"prompt": "Hi", "max_tokens": 1, "temperature": 0},
          "/answer": {"question": "Hi", "max_tokens": 1, "temperature": 0}}


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    config = ServerConfig(api_key=KEY, cors_origins=(ALLOWED,), allowed_hosts=("box.lan",))
    with running_server(config=config) as running:
        yield running


def _port(server: Running) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code", "param"}
    if code is not None:
        assert err["code"] == code, err
    return err  # type: ignore[no-any-return]


# -- Content-Type ----------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(BODIES))
@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx",
                                          "application/xml", ""])
def test_a_post_that_is_not_json_is_415(server: Running, path: str,
                                        content_type: str | None) -> None:
    # what a cross-site form or a fetch(mode: "no-cors") can send without a CORS preflight
    import json

    headers = {**AUTH} if content_type is None else {**AUTH, "Content-Type": content_type}
    r = http.post(f"{server.url}{path}", content=json.dumps(BODIES[path]), headers=headers,
                   timeout=60)
    if content_type is None:
        assert "content-type" not in r.request.headers
    err = _error(r, 415, "unsupported_media_type")
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON;charset=UTF-8"])
def test_json_content_types_are_accepted(server: Running, content_type: str) -> None:
    import json

    r = http.post(f"{server.url}/v1/chat/completions", headers={**AUTH,
                   "Content-Type": content_type},
                   content=json.dumps(BODIES["/v1/chat/completions"]), timeout=60)
    assert r.status_code == 200, r.text


# -- Host ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example",
                                  "localhost.evil.example:{port}", "10.0.0.5:{port}",
                                  "box.lan.evil.example", "[::2]:{port}"])
@pytest.mark.parametrize("method,path", [("GET", "/health"), ("GET", "/v1/models"),
                                         ("GET", "/"), ("POST", "/v1/chat/completions")])
def test_a_foreign_host_on_loopback_is_403(server: Running, host: str, method: str,
                                           path: str) -> None:
    # DNS rebinding: a page at evil.example whose name now resolves to 127.0.0.1
    headers = {**AUTH, "Host": host.format(port=_port(server))}
    r = http.request(method, f"{server.url}{path}", headers=headers, timeout=60,
                      json=BODIES.get(path) if method == "POST" else None)
    err = _error(r, 403, "host_not_allowed")
    assert err["type"] == "permission_error"
    assert "--allowed-host" in err["message"]


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "127.0.0.1", "localhost:{port}",
                                  "LOCALHOST", "[::1]:{port}", "[::1]", "127.0.0.2:{port}",
                                  "app.localhost:{port}", "box.lan", "BOX.lan:{port}"])
def test_loopback_names_and_allowed_hosts_pass(server: Running, host: str) -> None:
    headers = {**AUTH, "Host": host.format(port=_port(server))}
    assert http.get(f"{server.url}/v1/models", headers=headers, timeout=60).status_code == 200
    r = http.post(f"{server.url}/v1/chat/completions", headers=headers,
                   json=BODIES["/v1/chat/completions"], timeout=60)
    assert r.status_code == 200, r.text


def test_a_star_allows_every_host() -> None:
    with running_server(config=ServerConfig(api_key=None, allowed_hosts=("*",))) as server:
        r = http.get(f"{server.url}/v1/models", headers={"Host": "anything.example"},
                      timeout=60)
        assert r.status_code == 200


# -- Origin ----------------------------------------------------------------------


@pytest.mark.parametrize("origin", [FOREIGN, "null", "http://127.0.0.1", "https://app.example:8443",
                                    "http://app.example"])
@pytest.mark.parametrize("path", sorted(BODIES))
def test_a_post_from_a_foreign_origin_is_403(server: Running, origin: str, path: str) -> None:
    r = http.post(f"{server.url}{path}", headers={**AUTH, "Origin": origin}, json=BODIES[path],
                   timeout=60)
    err = _error(r, 403, "origin_not_allowed")
    assert err["type"] == "permission_error"
    assert "--cors-origin" in err["message"]
    assert "access-control-allow-origin" not in r.headers


def test_the_servers_own_origin_and_allowed_origins_may_post(server: Running) -> None:
    body = BODIES["/answer"]
    own = http.post(f"{server.url}/answer", headers={**AUTH, "Origin": server.url}, json=body,
                     timeout=60)
    assert own.status_code == 200, own.text  # the page at / posts with its own origin
    allowed = http.post(f"{server.url}/answer", headers={**AUTH, "Origin": ALLOWED}, json=body,
                         timeout=60)
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == ALLOWED


def test_a_get_from_a_foreign_origin_is_not_readable(server: Running) -> None:
    # GETs change nothing; the browser keeps the answer from a foreign page (no CORS header)
    r = http.get(f"{server.url}/v1/models", headers={**AUTH, "Origin": FOREIGN}, timeout=60)
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers


# -- CORS ------------------------------------------------------------------------


def _preflight(server: Running, origin: str, path: str = "/v1/chat/completions"
               ) -> httpx.Response:
    return httpx.options(f"{server.url}{path}", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"}, timeout=60)


@pytest.mark.parametrize("path", [*sorted(BODIES), "/v1/models"])
def test_a_preflight_from_an_allowed_origin_passes_without_the_key(server: Running,
                                                                   path: str) -> None:
    r = _preflight(server, ALLOWED, path)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ALLOWED
    allowed_headers = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    assert "POST" in r.headers["access-control-allow-methods"]


@pytest.mark.parametrize("origin", [FOREIGN, "null"])
def test_a_preflight_from_a_refused_origin_is_403(server: Running, origin: str) -> None:
    r = _preflight(server, origin)
    _error(r, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in r.headers


def test_an_allowed_origin_reads_errors_too(server: Running) -> None:
    # the 401 and the 415 of an allowed page carry the CORS header, so its script can read them
    r = http.post(f"{server.url}/answer", headers={"Origin": ALLOWED}, json=BODIES["/answer"],
                   timeout=60)
    _error(r, 401)
    assert r.headers["access-control-allow-origin"] == ALLOWED
    r = http.post(f"{server.url}/answer", headers={**AUTH, "Origin": ALLOWED,
                   "Content-Type": "text/plain"}, content=b"{}", timeout=60)
    _error(r, 415)
    assert r.headers["access-control-allow-origin"] == ALLOWED


def test_without_cors_origins_a_preflight_is_refused() -> None:
    with running_server(config=ServerConfig(api_key=None)) as server:
        r = _preflight(server, FOREIGN)
        _error(r, 403, "origin_not_allowed")
        assert "access-control-allow-origin" not in r.headers


# -- settings and `ggufllm serve` ------------------------------------------------------


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_api_key_is_an_error_not_no_auth(monkeypatch: pytest.MonkeyPatch,
                                                  value: str) -> None:
    monkeypatch.setenv("GGUFLLM_API_KEY", value)
    with pytest.raises(ConfigError) as err:
        load_server_config()
    assert "GGUFLLM_API_KEY" in str(err.value) and "empty" in str(err.value)
    with pytest.raises(ConfigError):
        load_server_config(api_key=value)


def test_settings_read_allowed_hosts_and_origins_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GGUFLLM_API_KEY", raising=False)
    monkeypatch.setenv("GGUFLLM_ALLOWED_HOSTS", "Box.lan, proxy.example:8080")
    monkeypatch.setenv("GGUFLLM_CORS_ORIGINS", "https://App.example/, http://localhost:3000")
    config = load_server_config()
    assert config.allowed_hosts == ("box.lan", "proxy.example")
    assert config.cors_origins == ("https://app.example", "http://localhost:3000")
    with pytest.raises(ConfigError) as err:
        load_server_config(cors_origins=("app.example",))
    assert "GGUFLLM_CORS_ORIGINS" in str(err.value)


def _env(**extra: str) -> dict[str, str]:
    server_settings = ("GGUFLLM_API_KEY", "GGUFLLM_ALLOWED_HOSTS", "GGUFLLM_CORS_ORIGINS")
    env = {k: v for k, v in os.environ.items() if k not in server_settings}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_serve_with_an_empty_api_key_exits_with_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "ggufllm.cli", "serve", "--port",
                           str(free_port())], env=_env(GGUFLLM_API_KEY=""), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "GGUFLLM_API_KEY" in done.stderr and "empty" in done.stderr


def test_serve_flags_allow_a_host_and_an_origin() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ggufllm.cli", "serve", "--port", str(port),
                             "--ctx", "512", "--allowed-host", "box.lan", "--allowed-host",
                             "other.lan", "--cors-origin", ALLOWED], env=_env(), cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, 200, timeout_s=180, proc=proc)
        for host in ("box.lan", f"other.lan:{port}"):
            assert http.get(f"{url}/v1/models", headers={"Host": host},
                             timeout=10).status_code == 200
        _error(http.get(f"{url}/v1/models", headers={"Host": "evil.example"}, timeout=10), 403)
        _error(http.post(f"{url}/answer", headers={"Origin": FOREIGN}, json=BODIES["/answer"],
                          timeout=60), 403)
        assert _preflight_url(url, ALLOWED).headers["access-control-allow-origin"] == ALLOWED
    finally:
        proc.terminate()
        proc.wait(60)


def _preflight_url(url: str, origin: str) -> httpx.Response:
    return httpx.options(f"{url}/answer", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST"}, timeout=60)
