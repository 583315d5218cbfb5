"""The Docker deployment, short of building the images (no image registry is reachable here).

What the images run is tested for real: ``packaging/install.sh`` (the one install step of
both Dockerfiles) makes a fresh venv whose ``ggufllm`` answers; ``ggufllm serve --host
0.0.0.0``, the images' command, refuses to start without an API key unless told
``--insecure-no-key``; hadolint finds nothing in either Dockerfile. docs/docker.md says what
is left unchecked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ggufllm.server.bench import free_port

from .cli_runs import ggufllm_runs
from .server_fixture import wait_health

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "packaging" / "install.sh"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")


def _env(**extra: str) -> dict[str, str]:
    """This environment without a server key (or a model path) the caller did not ask for."""
    unset = ("GGUFLLM_API_KEY", "LLM_MODEL_PATH")
    return {**{k: v for k, v in os.environ.items() if k not in unset}, **extra}


def _serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "ggufllm.cli", "serve", *args]


def test_serve_refuses_a_network_address_without_a_key_before_loading(tmp_path: Path) -> None:
    # a model that does not exist: the refusal must come before the model is looked at
    missing = str(tmp_path / "absent.gguf")
    start = time.monotonic()
    done = subprocess.run(_serve("--host", "0.0.0.0", "--port", str(free_port()), "--model",
                                 missing), env=_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode in (1, 2), (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "0.0.0.0" in lines[0] and "GGUFLLM_API_KEY" in lines[0]
    assert "--insecure-no-key" in lines[0]
    assert "absent.gguf" not in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - start < 60


def test_every_non_loopback_host_is_refused(tmp_path: Path) -> None:
    hosts = ["::", "192.0.2.1", "box.lan"]
    # each run a process of its own, forked from one warm interpreter (tests/cli_runs.py)
    unset = {"GGUFLLM_API_KEY": None, "LLM_MODEL_PATH": None}
    for r in ggufllm_runs([("serve", "--host", host, "--port", str(free_port()))
                           for host in hosts], tmp_path, env=unset):
        assert r.returncode in (1, 2) and "--insecure-no-key" in r.stderr, (r.args, r.stderr)


@pytest.mark.slow
def test_serve_with_insecure_no_key_starts_on_every_address(tmp_path: Path) -> None:
    port = free_port()
    # cwd holds no models/llm: the embedded default model serves
    proc = subprocess.Popen(_serve("--host", "0.0.0.0", "--port", str(port), "--ctx", "512",
                                   "--insecure-no-key", "--drain-timeout", "0"),
                            env=_env(), cwd=tmp_path)
    try:
        assert wait_health(f"http://127.0.0.1:{port}", 200, timeout_s=180,
                           proc=proc).json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.slow
def test_serve_with_a_key_starts_on_every_address(tmp_path: Path) -> None:
    """With a key the check passes; /health needs no key and answers while the model loads."""
    port = free_port()
    proc = subprocess.Popen(_serve("--host", "0.0.0.0", "--port", str(port), "--ctx", "512",
                                   "--drain-timeout", "0"),
                            env=_env(GGUFLLM_API_KEY="docker-key"), cwd=tmp_path)
    try:
        assert wait_health(f"http://127.0.0.1:{port}", 200, timeout_s=180, proc=proc)
    finally:
        proc.terminate()
        proc.wait(60)


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed (the test extra has it: pip install -e '.[test]')")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_finds_nothing(dockerfile: str) -> None:
    done = subprocess.run([_hadolint(), "--config", str(ROOT / ".hadolint.yaml"),
                           "--no-color", dockerfile], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_both_images_serve_as_the_seed_deployed(dockerfile: str) -> None:
    """Port 8000 on every address, models in a volume, the key from the environment, a
    health check on /health with Python (no curl in the images), not root."""
    text = (ROOT / dockerfile).read_text()
    assert 'CMD ["ggufllm", "serve", "--host", "0.0.0.0", "--port", "8000"]' in text
    assert "packaging/install.sh" in text and "EXPOSE 8000" in text
    assert 'VOLUME ["/app/models"]' in text and "LLM_MODEL_PATH=/app/models/llm" in text
    assert "HEALTHCHECK" in text and "/health" in text and "curl" not in text
    user = [line for line in text.splitlines() if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")


def test_the_build_context_leaves_out_models_and_the_venv() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[[i for i, line in enumerate(lines) if not line.startswith("#")][0]] == "*"
    for needed in ("pyproject.toml", "constraints.txt", "CMakePresets.json", "ggufllm/",
                   "packaging/"):
        assert f"!{needed}" in lines
    assert not any(line.startswith(("!models", "!.venv")) for line in lines)


def _dry_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(INSTALL), "--dry-run", *args, "/nonexistent/venv"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable})


@pytest.mark.parametrize("preset", ["cuda", "cuda-sm90", "cpu-portable"])
def test_the_install_script_builds_a_preset_with_ggufllms_own_cmake_args(preset: str) -> None:
    from ggufllm.gpu.presets import load_presets

    done = _dry_run("--preset", preset)
    assert done.returncode == 0, done.stderr
    assert f"CMAKE_ARGS={load_presets()[preset].cmake_args}" in done.stdout.splitlines()
    assert "--no-binary llama-cpp-python" in done.stdout and "--no-cache-dir" in done.stdout
    assert f"PIP_CONSTRAINT={ROOT / 'constraints.txt'}" in done.stdout


def test_the_install_script_names_the_presets_when_one_is_unknown() -> None:
    done = _dry_run("--preset", "cuda-sm1")
    assert done.returncode != 0
    assert "unknown preset 'cuda-sm1'" in done.stderr and "cuda-sm90" in done.stderr


@pytest.mark.slow
def test_the_install_script_makes_a_venv_that_answers(tmp_path: Path) -> None:
    """The images' install step, CPU mode, in a fresh venv. llama-cpp-python comes from pip's
    wheel cache when an earlier install of the same version left it there (a few seconds),
    else it compiles (about 10 minutes on 2 cores)."""
    venv = tmp_path / "venv"
    start = time.monotonic()
    # PIP_NO_COMPILE=0 (pip reads it as --no-compile): the images compile every installed
    # module to bytecode at build time, which no assertion here can see; skipped, the
    # script runs 21 s instead of 25 on one core (modules the run imports compile then)
    done = subprocess.run(["sh", str(INSTALL), "--extras", "default-model", str(venv)],
                          capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHON": sys.executable, "PIP_NO_COMPILE": "0"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"packaging/install.sh: {time.monotonic() - start:.0f} s")
    ggufllm = str(venv / "bin" / "ggufllm")
    helped = subprocess.run([ggufllm, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "serve" in helped.stdout, helped.stderr
    # from a folder with no models/llm: the embedded default model answers
    asked = subprocess.run([ggufllm, "ask", "What is the capital of France?"], cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.strip()
