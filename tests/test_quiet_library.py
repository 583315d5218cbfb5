"""The library prints nothing on an application's stderr unless the application
configured logging (llama.cpp's load warnings go through ``logging``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LOAD = """
{setup}
from ggufllm import LLMService
svc = LLMService({path!r}, max_length=256)
svc.load()
svc.close()
"""


def run(path: Path, setup: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", LOAD.format(setup=setup, path=str(path))],
                          capture_output=True, text=True, timeout=300, env=env, check=True)


def test_no_output_when_the_application_did_not_configure_logging(default_gguf):
    assert run(default_gguf).stderr == ""


def test_warnings_reach_an_application_that_configured_logging(default_gguf):
    # the same load does warn: the silence above is the handler's doing
    out = run(default_gguf, "import logging; logging.basicConfig(level=logging.WARNING)")
    assert "WARNING:ggufllm.llama_cpp:" in out.stderr
