import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import ggufllm


def test_public_surface_is_what_it_claims():
    for name in ggufllm.__all__:
        assert getattr(ggufllm, name) is not None


def test_error_tree_has_one_root():
    for name in ggufllm.__all__:
        obj = getattr(ggufllm, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ggufllm.GgufllmError)


def test_import_is_cheap_and_loads_nothing():
    code = ("import sys, ggufllm; "
            "assert ggufllm._service is None; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "import os; assert os.environ['HF_HUB_OFFLINE'] == '1'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_llm_service_singleton_is_lazy_and_shared():
    assert ggufllm.llm_service is ggufllm.llm_service
    assert not ggufllm.llm_service.is_loaded


def test_llm_service_singleton_is_made_once_when_threads_race(monkeypatch):
    made = []

    class SlowService:  # the window two first accesses race in, widened
        def __init__(self) -> None:
            made.append(self)
            time.sleep(0.05)

    monkeypatch.setattr(ggufllm, "_service", None)
    monkeypatch.setattr(ggufllm, "LLMService", SlowService)
    n = 8
    barrier = threading.Barrier(n)

    def first_access(_: int) -> object:
        barrier.wait(10)
        return ggufllm.llm_service

    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(first_access, range(n)))
    assert len(made) == 1 and all(g is made[0] for g in got)
