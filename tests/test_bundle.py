"""The PyInstaller bundle (``packaging/ggufllm.spec``) answers with no Python around it.

The module builds the one-folder bundle into a temporary folder once (minutes), then runs
it as a user without Python would: no virtual environment, no ``PYTHONPATH`` or
``PYTHONHOME``, the venv's ``bin`` off ``PATH``, an empty working folder and a fresh
``HOME``, so that the embedded model is assembled, and the CPU kernel self-test and the
probe load run as children of the bundle, from scratch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 1800.0
RUN_TIMEOUT_S = 600.0
QUESTION = "What is the capital of France?"


def build_bundle(out: Path) -> Path:
    """Builds the bundle under ``out`` and returns its executable, ``out/dist/ggufllm/ggufllm``."""
    done = subprocess.run(
        [sys.executable, "-m", "PyInstaller", "--noconfirm", "--log-level", "WARN",
         "--distpath", str(out / "dist"), "--workpath", str(out / "build"),
         str(ROOT / "packaging" / "ggufllm.spec")],
        cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    exe = out / "dist" / "ggufllm" / "ggufllm"
    assert exe.is_file() and os.access(exe, os.X_OK)
    return exe


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle"))


def bare_env(home: Path) -> dict[str, str]:
    """This process's environment without Python's: no venv, PYTHON* or cache overrides."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    dropped = {"VIRTUAL_ENV", "XDG_CACHE_HOME", "GGUFLLM_CACHE_DIR", "LLM_MODEL_PATH"}
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("PYTHON")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != venv_bin)
    env["HOME"] = str(home)
    return env


def run(exe: Path, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Runs the bundle in an empty folder with a fresh HOME under ``tmp_path``."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    return subprocess.run([str(exe), *args], cwd=work, env=bare_env(home), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)


def test_the_bundle_answers_without_python(bundle: Path, tmp_path: Path) -> None:
    # greedy: the answer is the model's best, not a draw
    done = run(bundle, ["ask", QUESTION, "--temperature", "0"], tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Paris" in done.stdout
    # both children ran inside the bundle (sys.executable is the bundle): each left its verdict
    cache = tmp_path / "home" / ".cache" / "ggufllm"
    verdicts = [json.loads(p.read_text()) for p in (cache / "kernels").glob("*.json")]
    assert len(verdicts) == 1, done.stderr[-4000:]
    assert verdicts[0]["status"] in ("passed", "failed")
    assert not verdicts[0]["reason"].startswith("the test could not run"), verdicts[0]
    assert len(list((cache / "probed").iterdir())) == 1, done.stderr[-4000:]


def test_the_bundle_helps_and_runs_only_its_own_children(bundle: Path, tmp_path: Path) -> None:
    helped = run(bundle, ["--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "ask" in helped.stdout and "serve" in helped.stdout
    # `python -m ggufllm.cli` (how `ggufllm bench` starts its server) is the command too
    as_module = run(bundle, ["-m", "ggufllm.cli", "--help"], tmp_path)
    assert (as_module.returncode, as_module.stdout) == (0, helped.stdout)
    # a script of the same name outside the bundle is an argument, never code to run
    marker = tmp_path / "ran"
    script = tmp_path / "_probe_child.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    refused = run(bundle, [str(script)], tmp_path)
    assert refused.returncode == 2 and not marker.exists()
    # Ray is left out of the bundle: --replicas says so before anything loads
    no_ray = run(bundle, ["serve", "--replicas", "2"], tmp_path)
    assert no_ray.returncode == 2 and "the bundle leaves out" in no_ray.stderr, no_ray.stderr
