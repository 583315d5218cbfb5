"""Shared fixtures: the real default model and a loaded service over it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufllm import LLMService
from ggufllm.resolve import default_model_path


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The embedded Gemma 3 270M Q4_K_M GGUF (assembled from its PyPI package)."""
    return default_model_path()


@pytest.fixture(scope="module")
def service(default_gguf: Path) -> Iterator[LLMService]:
    """One loaded service per test module (loading costs ~1 s)."""
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    svc = LLMService(default_gguf, max_length=1024)
    svc.load()
    yield svc
    svc.close()
