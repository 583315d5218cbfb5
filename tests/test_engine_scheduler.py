"""The scheduler thread: no deadlock, no hang, no use-after-free, a bounded queue, cancellation.

Each repro runs in a thread joined with a timeout, so a regression fails the
test instead of hanging the suite.

Where what a repro decodes matters only as equal or not, it runs on the tiny gpt-oss fixture
(``tiny_gguf``: random weights, prompts evaluated ~20x faster than the default model's): an
answer is then checked against the same question's answer computed alone, not by what it
says. The closes and full queues keep the embedded default model: a close that lands during
prompt evaluation needs the slower prompt, and the others cost a load either way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ggufllm import Answer, LLMService, ServerBusyError, ServiceClosedError, Turn

from .near_tie import END
from .near_tie import assert_equal_or_near_ties as near_ties

GREEDY = dict(temperature=0.0, max_tokens=16)
STORY = "Tell me a long story about a dragon."
CAPITAL = "What is the capital of France?"


def run_with_timeout(fn: Callable[[], object], timeout: float = 120.0) -> object:
    """Runs ``fn`` in a thread; fails the test if it does not return within ``timeout``."""
    box: list[object] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # handed to the test thread
            box.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"did not return within {timeout} s (deadlock?)"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


@pytest.fixture
def small(default_gguf: Path) -> Iterator[LLMService]:
    """A service of its own (some tests close it), 2 slots, queue of 1."""
    svc = LLMService(default_gguf, max_length=512, n_parallel=2, max_queue=1)
    svc.load()
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def tiny(tiny_path: Path) -> Iterator[LLMService]:
    """The tiny gpt-oss fixture with the default 4 slots, shared by the module."""
    svc = LLMService(tiny_path, max_length=1024)
    svc.load()
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def one_slot(tiny_path: Path) -> Iterator[LLMService]:
    """One slot, shared by the tests that leave it open: a second request waits for it."""
    svc = LLMService(tiny_path, max_length=256, n_parallel=1)
    svc.load()
    yield svc
    svc.close()


def alone(svc: LLMService, question: str) -> Answer:
    """The greedy answer to ``question`` computed alone, from an empty cache."""
    svc.clear_kv_cache()
    return svc.answer(question, **GREEDY)


def _ids(answer: Answer) -> tuple[int, ...]:
    return tuple(answer.token_ids) + ((END,) if answer.finish_reason == "stop" else ())


def assert_answers(svc: LLMService, model: Path, question: str, answer: Answer,
                   reference: Answer) -> None:
    """``answer`` (computed beside or after other requests) answers ``question``: it equals
    ``reference`` (the answer computed alone), or leaves it only at a near tie of the lone
    path's logits (``tests/near_tie.py``); an answer to anything else leaves it at once."""
    assert answer.text and answer.finish_reason in ("stop", "length"), answer
    prompt = svc._engine.prompts.build([Turn("user", question)], svc.generation_config).tokens
    assert answer.timings.n_prompt == len(prompt)
    near_ties(model, [(prompt, _ids(reference), _ids(answer))])


def test_suspended_stream_does_not_block_the_same_thread(tiny, tiny_path):
    reference = alone(tiny, CAPITAL)

    def repro() -> Answer:
        s = tiny.stream(STORY, temperature=0.0, max_tokens=64)
        next(s)
        answer = tiny.answer(CAPITAL, **GREEDY)
        s.close()
        return answer

    assert_answers(tiny, tiny_path, CAPITAL, run_with_timeout(repro), reference)


def test_suspended_stream_does_not_block_with_one_slot(one_slot, tiny_path):
    reference = alone(one_slot, CAPITAL)

    def repro() -> Answer:
        s = one_slot.stream(STORY, temperature=0.0, max_tokens=16)
        next(s)  # holds the only slot until its budget is spent, not until it is read
        try:
            return one_slot.answer(CAPITAL, **GREEDY)
        finally:
            s.close()

    assert_answers(one_slot, tiny_path, CAPITAL, run_with_timeout(repro), reference)


def test_clear_gpu_cache_inside_a_stream_loop(tiny):
    def answer(clear_at: int | None) -> tuple[str, str | None]:
        tiny.clear_gpu_cache()  # both answers start cold: neither reuses the other's prefix
        chunks = []
        for i, chunk in enumerate(tiny.stream(STORY, temperature=0.0, max_tokens=16)):
            if i == clear_at:
                tiny.clear_gpu_cache()
            chunks.append(chunk)
        return "".join(c.text for c in chunks), chunks[-1].finish_reason

    cold = run_with_timeout(lambda: answer(None))
    # the running stream kept its cells: the same greedy answer, however this CPU ends it
    assert run_with_timeout(lambda: answer(2)) == cold
    assert cold[1] in ("length", "stop") and cold[0]


def test_close_inside_a_stream_loop(small):
    def repro() -> list[str | None]:
        reasons = []
        for i, chunk in enumerate(small.stream(STORY, temperature=0.0, max_tokens=200)):
            if i == 2:
                small.close()
            reasons.append(chunk.finish_reason)
        return reasons

    reasons = run_with_timeout(repro)
    assert reasons[-1] == "cancelled" and len(reasons) < 200
    with pytest.raises(ServiceClosedError):
        small.generate_answer("hi")


def test_close_from_another_thread_during_prompt_evaluation(small):
    context = "The quick brown fox jumps over the lazy dog. " * 12  # three prompt pages
    closer: list[threading.Thread] = []
    started_at: list[tuple[int, int]] = []

    def on_progress(done: int, total: int) -> None:
        if not closer:
            started_at.append((done, total))
            closer.append(threading.Thread(target=small.close))
            closer[0].start()

    def repro() -> list[str | None]:
        return [c.finish_reason for c in small.stream(
            "Summarize.", context, on_prompt_progress=on_progress, temperature=0.0,
            max_tokens=32)]

    reasons = run_with_timeout(repro)
    closer[0].join(60)
    done, total = started_at[0]
    assert done < total  # the close began with prompt pages still to evaluate
    assert reasons[-1] == "cancelled"
    assert not small.is_loaded


def test_close_while_other_threads_tokenize(default_gguf):
    svc = LLMService(default_gguf, max_length=512)
    svc.load()
    context = "word " * 300
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                svc.stream("Summarize.", context, max_tokens=1).close()
            except ServiceClosedError:
                return
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    run_with_timeout(svc.close, 60)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors


def test_full_queue_raises_server_busy_at_call_time(small):
    running = [small.stream(STORY, temperature=0.0, max_tokens=200) for _ in range(2)]
    waiting = small.stream(STORY, temperature=0.0, max_tokens=200)  # the queue holds 1
    with pytest.raises(ServerBusyError):
        small.stream(STORY, temperature=0.0, max_tokens=200)
    deadline = time.monotonic() + 60
    while small.get_model_info()["scheduler"]["running"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert small.get_model_info()["scheduler"] == {"running": 2, "waiting": 1, "max_queue": 1}
    for s in running + [waiting]:
        s.close()


def placements(svc: LLMService) -> int:
    """Prompts the slot table has placed so far (each one a cache hit or a miss)."""
    kv = svc.get_model_info()["kv_cache"]
    return kv["hits"] + kv["misses"]


def test_a_waiting_request_cancelled_before_its_prefill_is_never_evaluated(one_slot):
    svc = one_slot
    before = placements(svc)
    # holds the only slot until its budget is spent: ~0.25 s of decoding here, long after the
    # waiting request was queued and closed
    first = svc.stream(STORY, temperature=0.0, max_tokens=96)
    next(first)
    evaluated: list[int] = []
    waiting = svc.stream("What is 2+2?", on_prompt_progress=lambda d, t: evaluated.append(d),
                         **GREEDY)
    waiting.close()
    # the running request ends as it would have (not cancelled with the waiting one)
    assert [c.finish_reason for c in first][-1] in ("stop", "length")
    svc.generate_answer("Who wrote Hamlet?", **GREEDY)  # the scheduler went past it
    assert evaluated == []
    assert placements(svc) - before == 2  # two placements, not three


def test_prompt_progress_is_reported_per_page(tiny):
    # with the harmony prompt's own ~100 tokens: three pages and a part
    context = "The quick brown fox jumps over the lazy dog. " * 10
    tiny.clear_kv_cache()
    seen: list[tuple[int, int]] = []
    # the answer does not matter here: one token
    tiny.answer("Summarize.", context, on_prompt_progress=lambda d, t: seen.append((d, t)),
                temperature=0.0, max_tokens=1)
    total = seen[-1][1]
    assert total > 2 * 64 and seen[-1][0] == total and len(seen) >= total // 64
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_failing_progress_callback_is_ignored(tiny):
    def boom(done: int, total: int) -> None:
        raise RuntimeError("callback bug")

    reference = alone(tiny, CAPITAL)
    tiny.clear_kv_cache()  # the same computation as the reference's, but for the callback
    answer = tiny.answer(CAPITAL, on_prompt_progress=boom, **GREEDY)
    assert answer.text and (answer.text, answer.token_ids, answer.finish_reason) == (
        reference.text, reference.token_ids, reference.finish_reason)


def test_a_small_kv_pool_caps_the_window_and_queues_what_does_not_fit(tiny_path):
    svc = LLMService(tiny_path, max_length=512, n_parallel=2, kv_cache_tokens=256)
    try:
        svc.load()
        kv = svc.get_model_info()["kv_cache"]
        assert (kv["n_ctx_pool"], kv["n_ctx"], kv["n_parallel"]) == (256, 256, 2)
        # each request reserves prompt + budget (~170 + 24 cells): the second waits for the
        # first. The cells are mostly prompt, evaluated a page per llama_decode, so that few
        # decode steps are spent on the wait.
        context = "The quick brown fox jumps over the lazy dog. " * 6
        budget = 24
        streams = [svc.stream(STORY, context, temperature=0.0, max_tokens=budget)
                   for _ in range(2)]
        # sampled while the first one decodes (it is admitted: it has handed a chunk), not
        # before the scheduler has looked at either, nor near the first one's end
        seen = []
        first = []
        for chunk in streams[0]:
            first.append(chunk)
            if len(first) <= 4 and chunk.finish_reason is None:
                sched = svc.get_model_info()["scheduler"]
                seen.append((sched["running"], sched["waiting"]))
        second = list(streams[1])
        assert 2 * (first[-1].timings.n_prompt + budget) > 256  # the two cannot fit together
        assert seen and all(s == (1, 1) for s in seen), seen
        assert first[-1].finish_reason in ("stop", "length")
        assert second[-1].finish_reason in ("stop", "length")
    finally:
        svc.close()
