"""The engine fails loudly and recovers: fault injection into the real engine.

A scheduler that stops on an unexpected error ends every request it holds with
``EngineFailedError`` (never a cut answer passed off as whole), the service
says so and reloads the model, a bounded number of times; a failing
``llama_decode`` fails only the requests it must and leaves no stale cells.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufllm import DecodeFailedError, EngineFailedError, LLMService
from ggufllm.engine.stepper import Stepper

QUESTION = "What is the capital of France?"


@pytest.fixture
def svc(default_gguf: Path) -> Iterator[LLMService]:
    """A service of its own, for the tests that make its engine fail."""
    service = LLMService(default_gguf, max_length=512, n_parallel=2)
    service.load()
    yield service
    service.close()


@pytest.fixture
def patched_decode(service: LLMService, monkeypatch: pytest.MonkeyPatch):
    """patched_decode(fn) makes fn(batch, real_decode) the engine's llama_decode for this test
    (on the module's shared service: a failed batch does not fail the engine). Returns the
    service, its cache cleared: the prompts are evaluated as on a fresh one."""
    ctx = service._engine.scheduler._ctx
    real = ctx.decode

    def patch(fn) -> LLMService:
        monkeypatch.setattr(ctx, "decode", lambda batch: fn(batch, real))
        service.clear_kv_cache()
        return service

    yield patch
    assert service.health.failures == 0 and service._engine.scheduler._ctx is ctx


def _wait(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _boom(*_args, **_kwargs):
    raise MemoryError("injected")


def _admit_boom(self: Stepper) -> None:
    if self._waiting:  # a request is waiting: its admission fails
        raise MemoryError("injected")


def test_a_scheduler_error_ends_running_requests_with_an_error_and_the_model_reloads(svc):
    failed_engine = svc._engine
    running = svc.stream(QUESTION, temperature=0, max_tokens=200, stop=())
    first = next(running)  # generating now
    assert first.finish_reason is None
    failed_engine.slots.place = _boom  # the next admission raises in the scheduler thread
    with pytest.raises(EngineFailedError) as late:
        svc.generate_answer("And of Italy?", temperature=0, max_tokens=8)
    with pytest.raises(EngineFailedError):  # the running stream ends with the error
        for _chunk in running:
            pass
    assert "MemoryError: injected" in late.value.reason
    _wait(lambda: svc.health.reloads == 1)
    info = svc.get_model_info()
    assert info["engine"]["state"] == "ok" and info["engine"]["failures"] == 1
    assert "MemoryError" in info["engine"]["last_failure"]
    assert svc._engine is not failed_engine and svc.is_loaded
    assert "Paris" in svc.generate_answer(QUESTION, temperature=0, max_tokens=8)


def test_reloads_are_bounded_then_calls_fail_until_load(svc, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Stepper, "_admit", _admit_boom)  # every engine fails at its first request
    for i in range(4):  # three reloads are allowed in the window, the fourth failure stays
        with pytest.raises(EngineFailedError):
            svc.generate_answer(QUESTION, max_tokens=4)
        _wait(lambda i=i: svc.health.failures == i + 1 and svc.health.state != "reloading")
    assert svc.health.state == "failed" and not svc.is_loaded
    assert svc.get_model_info()["engine"]["state"] == "failed"
    with pytest.raises(EngineFailedError, match="gave up reloading"):
        svc.generate_answer(QUESTION, max_tokens=4)
    assert svc.health.failures == 4 and svc.health.reloads == 3
    monkeypatch.undo()
    svc.load()  # an explicit load starts the bound again
    assert "Paris" in svc.generate_answer(QUESTION, temperature=0, max_tokens=8)


def test_a_failed_decode_fails_its_request_and_leaves_no_stale_cells(patched_decode):
    calls = {"n": 0}

    def decode_then_fail(batch, real):  # the cells get stored, then the call "fails"
        calls["n"] += 1
        rc = real(batch)
        return -3 if calls["n"] == 1 else rc

    svc = patched_decode(decode_then_fail)
    engine = svc._engine
    ctx = engine.scheduler._ctx
    with pytest.raises(DecodeFailedError) as caught:
        svc.generate_answer(QUESTION, temperature=0, max_tokens=8)
    assert caught.value.code == -3

    def cells_match_tokens() -> bool:
        return all(ctx.seq_pos_max(s.seq) == len(s.tokens) - 1 for s in engine.slots.slots)

    assert engine.scheduler.call(cells_match_tokens)
    assert "Paris" in svc.generate_answer(QUESTION, temperature=0, max_tokens=8)
    assert svc.health.failures == 0  # a failed batch is not a failed engine


def test_out_of_kv_cells_fails_only_the_newest_request_of_the_batch(patched_decode):
    state = {"failed": False}

    def full_once(batch, real):
        if not state["failed"] and len({batch._seq[i][0] for i in range(batch.n)}) == 2:
            state["failed"] = True
            return 1  # llama.cpp: no free KV cells (nothing stored)
        return real(batch)

    svc = patched_decode(full_once)
    results: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def ask(name: str, delay: float) -> None:
        barrier.wait()
        time.sleep(delay)
        try:
            results[name] = svc.generate_answer(QUESTION, temperature=0, max_tokens=8)
        except Exception as exc:
            results[name] = exc

    threads = [threading.Thread(target=ask, args=("older", 0.0)),
               threading.Thread(target=ask, args=("newer", 0.05))]
    ctx_lock = svc._engine.scheduler.call(lambda: None)  # the scheduler is idle and waiting
    assert ctx_lock is None
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert state["failed"], "the two prompts never shared a batch"
    assert isinstance(results["newer"], DecodeFailedError) and results["newer"].code == 1
    assert isinstance(results["older"], str) and "Paris" in results["older"]
