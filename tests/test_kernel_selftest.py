"""The CPU kernel self-test: a crashing llama.cpp kernel never takes the process down.

The crash itself (AMX on some Xeons) cannot be had on every machine, so the
child's death is injected (``GGUFLLM_KERNEL_FAULT``: a SIGSEGV at its first
decode, a hang, NaN logits from a poisoned embedding) and everything above it
is real: the child process, the verdict, the fallback load, the answer. Every
test runs with its own cache folder, so verdicts of injected faults never reach
the user's.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ggufllm import ConfigError, KernelSelfTestError, LLMService
from ggufllm.config import load_settings
from ggufllm.gguf_file import read_gguf_header
from ggufllm.native.kernel_model import weight_types, write_kernel_model
from ggufllm.native.kernels import FAULT_ENV, TIMEOUT_ENV, decide_extra_buffers
from ggufllm.server.bench import free_port

from . import http_calls as http
from .server_fixture import wait_health

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"
FAULTS = ["signal", "hang", "nan"]


@pytest.fixture
def fault(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Injects ``request.param`` into the self-test child, with a cache of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(FAULT_ENV, request.param)
    # a hang is reported whenever the timeout ends it (an idle wait: 1 s); the other faults
    # must end on their own first
    monkeypatch.setenv(TIMEOUT_ENV, "1" if request.param == "hang" else "3")
    return str(request.param)


@pytest.fixture
def own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(FAULT_ENV, raising=False)
    return tmp_path / "cache"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def test_the_verdict_on_this_cpu_is_remembered_and_decides_the_load(own_cache: Path,
                                                                    default_gguf: Path):
    summary = read_gguf_header(default_gguf, probe=False)
    first = decide_extra_buffers("auto", summary, 2)
    assert first.status in ("passed", "failed") and not first.cached
    assert first.use_extra_buffers == (first.status == "passed")
    assert set(first.weight_types) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}  # the file's matmul types
    again = decide_extra_buffers("auto", summary, 2)
    assert again.cached and again.status == first.status and again.seconds == 0.0
    assert len(list((own_cache / "ggufllm" / "kernels").glob("*.json"))) == 1
    # whatever this CPU decided, the service answers with what the verdict said
    with LLMService(default_gguf, max_length=512) as svc:
        answer = svc.generate_answer(QUESTION, temperature=0, max_tokens=8)
        info = svc.get_model_info()["cpu_extra_buffers"]
    assert "Paris" in answer
    assert info["status"] == first.status and info["cached"]
    repacked = {"CPU_REPACK", "AMX"} & set(info["buffers_in_use"])
    assert bool(repacked) == (first.status == "passed")


@pytest.mark.parametrize("fault", FAULTS, indirect=True)
def test_a_failing_self_test_loads_without_extra_buffers_and_answers(
        fault: str, default_gguf: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="ggufllm"):
        with LLMService(default_gguf, max_length=512) as svc:
            answer = svc.generate_answer(QUESTION, temperature=0, max_tokens=8)
            info = svc.get_model_info()["cpu_extra_buffers"]
    assert "Paris" in answer
    assert info["status"] == "failed" and not info["use_extra_buffers"]
    # the injected fault's reason; on a CPU whose real kernels crash (an AMX Xeon) the decode
    # dies before poisoned logits can be read: that crash is the reason there
    expected = {"signal": "SIGSEGV", "hang": "hung", "nan": "non-finite"}[fault]
    assert expected in info["reason"] or (fault == "nan" and "died" in info["reason"]), info
    assert not {"CPU_REPACK", "AMX"} & set(info["buffers_in_use"])  # weights stayed as stored
    notices = [r for r in caplog.records if "self-test" in r.getMessage()]
    assert len(notices) == 1 and "CPU_EXTRA_BUFFERS" in notices[0].getMessage()


@pytest.mark.parametrize("fault", ["signal"], indirect=True)
def test_on_with_a_failing_self_test_is_a_typed_error_and_force_is_the_users_choice(
        fault: str, default_gguf: Path):
    svc = LLMService(default_gguf, max_length=512, cpu_extra_buffers="on")
    with pytest.raises(KernelSelfTestError) as caught:
        svc.load()
    assert caught.value.field == "CPU_EXTRA_BUFFERS" and "SIGSEGV" in caught.value.reason
    assert isinstance(caught.value, ConfigError) and not svc.is_loaded
    svc.close()
    # force: no test at all (the injected crash lives in the test child, which never runs)
    summary = read_gguf_header(default_gguf, probe=False)
    forced = decide_extra_buffers("force", summary, 2)
    assert forced.use_extra_buffers and forced.status == "not tested"
    off = decide_extra_buffers("off", summary, 2)
    assert not off.use_extra_buffers and off.status == "not tested"


def test_cpu_extra_buffers_is_a_validated_setting(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CPU_EXTRA_BUFFERS", "off")
    assert load_settings().cpu_extra_buffers == "off"
    monkeypatch.setenv("CPU_EXTRA_BUFFERS", "maybe")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.field == "CPU_EXTRA_BUFFERS"


def test_ask_answers_with_one_notice_when_the_kernels_crash(tmp_path: Path):
    env = _env(XDG_CACHE_HOME=str(tmp_path / "cache"), **{FAULT_ENV: "signal"})
    r = subprocess.run([sys.executable, "-m", "ggufllm.cli", "ask", QUESTION, "--temperature",
                        "0", "--max-tokens", "8"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    notices = [line for line in r.stderr.splitlines() if "self-test" in line]
    assert len(notices) == 1 and "SIGSEGV" in notices[0] and "CPU_EXTRA_BUFFERS" in notices[0]
    assert notices[0] in (ROOT / "docs" / "cpus.md").read_text("utf-8")  # docs/cpus.md quotes it as is
    # the same machine, CPU_EXTRA_BUFFERS=on: one error line, a clean exit, no crash
    on = subprocess.run([sys.executable, "-m", "ggufllm.cli", "ask", QUESTION],
                        capture_output=True, text=True, cwd=tmp_path, timeout=300,
                        env={**env, "CPU_EXTRA_BUFFERS": "on"}, stdin=subprocess.DEVNULL)
    assert on.returncode not in (0, -11) and on.returncode > 0
    errors = [line for line in on.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "CPU_EXTRA_BUFFERS" in errors[0], on.stderr
    # the verdict was remembered: the second run did not test again
    assert len(list((tmp_path / "cache" / "ggufllm" / "kernels").glob("*.json"))) == 1


def test_chat_answers_when_the_kernels_crash(tmp_path: Path):
    pexpect = pytest.importorskip("pexpect")
    env = _env(XDG_CACHE_HOME=str(tmp_path / "cache"), TERM="dumb", **{FAULT_ENV: "signal"})
    child = pexpect.spawn(sys.executable, ["-m", "ggufllm.cli", "chat", "--temperature", "0",
                                           "--max-tokens", "16"], cwd=str(tmp_path), env=env,
                          encoding="utf-8", timeout=300, dimensions=(40, 200))
    try:
        child.expect("self-test")
        child.expect_exact(">>> ")
        child.sendline(QUESTION)
        child.expect("Paris")
        child.expect_exact(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_serve_answers_and_reports_the_verdict_when_the_kernels_crash(tmp_path: Path):
    port = free_port()
    env = _env(XDG_CACHE_HOME=str(tmp_path / "cache"), **{FAULT_ENV: "signal"})
    proc = subprocess.Popen([sys.executable, "-m", "ggufllm.cli", "serve", "--port", str(port),
                             "--ctx", "1024"], env=env, cwd=tmp_path, stderr=subprocess.PIPE,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_health(url, 200, timeout_s=180, proc=proc)
        r = http.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8,
            "temperature": 0})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        assert wait_health(url, 200).status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, -15), err  # SIGTERM: uvicorn's graceful exit
    assert sum("self-test" in line for line in err.splitlines()) == 1


def test_doctor_reports_the_verdict_and_the_buffer_types(own_cache: Path, default_gguf: Path):
    r = subprocess.run([sys.executable, "-m", "ggufllm.cli", "doctor", "--json", "--model",
                        str(default_gguf)], capture_output=True, text=True, env=_env(),
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    cpu = json.loads(r.stdout)["cpu"]
    assert cpu["self_test"]["status"] in ("passed", "failed")
    assert cpu["self_test"]["weight_types"] == ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]
    assert isinstance(cpu["extra_buffer_types"], list) and isinstance(cpu["features"], list)
    text = subprocess.run([sys.executable, "-m", "ggufllm.cli", "doctor", "--model",
                           str(default_gguf)], capture_output=True, text=True, env=_env(),
                          timeout=300, stdin=subprocess.DEVNULL)
    assert "CPU kernel self-test:" in text.stdout and "(remembered)" in text.stdout


def test_the_test_model_carries_the_real_types_and_experts(tmp_path: Path, tiny_gguf,
                                                          own_cache: Path):
    """gpt-oss is never loaded for the test: a tiny model with its weight types serves."""
    gpt_oss = read_gguf_header(tiny_gguf("q8_0"), probe=False)
    types = weight_types(gpt_oss)
    assert "MXFP4" in types and "Q8_0" in types
    out = write_kernel_model(gpt_oss, tmp_path / "k.gguf")
    small = read_gguf_header(out, probe=False)
    assert set(weight_types(small)) == set(types)
    experts = [t for t in small.tensors if t.name.endswith("_exps.weight")]
    assert experts and all(len(t.shape) == 3 for t in experts)
    assert out.stat().st_size < 8 << 20
    # llama.cpp loads it and decodes through the experts (MUL_MAT_ID) in the child
    verdict = decide_extra_buffers("auto", gpt_oss, 2)
    assert verdict.status in ("passed", "failed") and "could not run" not in verdict.reason
    # an F32-only model has nothing an extra buffer type repacks: nothing to test
    f32 = read_gguf_header(tiny_gguf("f32"), probe=False)
    if not weight_types(f32):
        assert decide_extra_buffers("auto", f32, 2).status == "not tested"

