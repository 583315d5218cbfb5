"""LLMService on the real llama.cpp engine.

What the embedded Gemma 3 270M model answers and reports (the quickstart question, an answer
that uses its context, a raw continuation, its model info) is checked on that model, and so
is how its plain-text output streams (chunks joined, stop strings), and every test that
loads a service of its own (loads, unloads, file choices, independent instances, eight
slots): a load of the tiny fixture below costs a little more than one of the default model,
more than the few answers those tests decode would save. The engine's and the service's
mechanics on the shared service (cancellation, concurrency, async tasks, the prefix cache,
generation defaults) run on the tiny gpt-oss fixture (``tiny_gguf``: random weights, the
real o200k_harmony tokenizer), which evaluates a prompt ~20x faster: its answers are
arbitrary tokens, so there only equalities, counts, errors and finish reasons are asserted.
(Its random output opens no harmony header, so the parser holds its first 128 bytes back as
a would-be header: the tests of how text streams stay on the default model. The parameter
checks, which decode nothing, ask the default model's service.)
"""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ggufllm import (
    Answer,
    ContextLengthExceededError,
    InvalidParameterError,
    LLMService,
    LoadCancelledError,
    ServiceClosedError,
    Turn,
)

from .near_tie import END
from .near_tie import assert_equal_or_near_ties as near_ties

GREEDY = dict(temperature=0.0, max_tokens=32)
# the tiny model's answers never end early (random weights): 16 tokens each, where the
# default model's answers to these questions mostly end before GREEDY's 32
SHORT = dict(temperature=0.0, max_tokens=16)
QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "What is 2+2?",
             "Name a primary color.", "What is the largest ocean on Earth?",
             "Why is the sky blue?", "What language is spoken in Brazil?", "What is water made of?"]


@pytest.fixture(scope="module")
def tiny(tiny_path: Path) -> Iterator[LLMService]:
    """The tiny gpt-oss fixture, loaded once for the module's mechanics tests (as ``service``
    is for the default model: 1024 tokens, the default 4 slots)."""
    svc = LLMService(tiny_path, max_length=1024)
    svc.load()
    yield svc
    svc.close()


def test_answers_the_quickstart_question(service):
    assert "Paris" in service.generate_answer("What is the capital of France?", **GREEDY)


def test_answer_uses_the_rag_context(service):
    context = "The Zorblat festival is held every spring in the town of Quenby."
    answer = service.generate_answer("Where is the Zorblat festival held?", context, **GREEDY)
    assert "Quenby" in answer


def test_stream_joined_equals_generate_answer(service):
    for q in QUESTIONS[:4]:
        chunks = list(service.stream(q, **GREEDY))
        joined = "".join(c.text for c in chunks if c.channel == "final")
        assert joined == service.generate_answer(q, **GREEDY)
        assert chunks[-1].finish_reason in ("stop", "length")
        assert chunks[-1].timings is not None and chunks[-1].timings.n_generated >= 1
        assert all(c.finish_reason is None for c in chunks[:-1])


def test_answer_object_reports_how_it_ended(service):
    a = service.answer("Why is the sky blue?", temperature=0.0, max_tokens=3)
    assert isinstance(a, Answer) and a.finish_reason == "length"
    assert a.timings.n_generated == 3 and len(a.token_ids) == 3
    assert a.reasoning == ""  # a model without channels writes no reasoning


def wait_idle(svc: LLMService, timeout: float = 60.0) -> float:
    """Seconds until no request runs or waits (fails past ``timeout``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        sched = svc.get_model_info()["scheduler"]
        if sched["running"] == 0 and sched["waiting"] == 0:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"the scheduler is still busy after {timeout} s")


def most_cached_tokens(svc: LLMService) -> int:
    return max(len(s.tokens) for s in svc._engine.slots.slots)


def generated_in_cache(svc: LLMService, question: str) -> int:
    """Tokens the longest slot holds past the question's prompt (what was generated)."""
    prompt = svc._engine.prompts.build([Turn("user", question)], svc.generation_config)
    return most_cached_tokens(svc) - len(prompt.tokens)


def test_abandoned_stream_is_cancelled_at_once(tiny):
    expected = tiny.generate_answer(QUESTIONS[5], **SHORT)
    tiny.clear_kv_cache()
    stream = tiny.stream("Tell me a long story about a dragon.", temperature=0.0,
                         max_tokens=400)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_idle(tiny)
    # cancelled within a few steps, far from its 400-token budget
    assert generated_in_cache(tiny, "Tell me a long story about a dragon.") < 30
    assert tiny.generate_answer(QUESTIONS[5], **SHORT) == expected


def test_dropped_stream_is_cancelled(tiny):
    tiny.clear_kv_cache()
    stream = tiny.stream("Tell me a long story about a dragon.", temperature=0.0,
                         max_tokens=400)
    next(stream)
    del stream
    gc.collect()
    wait_idle(tiny)
    assert generated_in_cache(tiny, "Tell me a long story about a dragon.") < 30


def test_closed_stream_ends_with_reason_cancelled(tiny, monkeypatch):
    # the closed iterator yields nothing more, so the reason is read where the scheduler
    # hands it: the last chunk it finishes the request with
    stepper = tiny._engine.scheduler.stepper
    reasons: list[str] = []
    finish = stepper._finish

    def recording(r, reason, *args, **kwargs):
        reasons.append(reason)
        return finish(r, reason, *args, **kwargs)

    monkeypatch.setattr(stepper, "_finish", recording)
    stream = tiny.stream("Tell me a long story about a dragon.", temperature=0.0,
                         max_tokens=400)
    next(stream)
    stream.close()
    assert list(stream) == []  # closed: nothing more
    wait_idle(tiny)
    assert reasons == ["cancelled"]


@pytest.fixture(scope="module")
def lone(tiny: LLMService) -> dict[str, Answer]:
    """The tiny model's greedy answer to each question, computed alone (one at a time)."""
    return {q: tiny.answer(q, **SHORT) for q in QUESTIONS}


def test_concurrent_answers_leave_sequential_ones_only_at_near_ties(tiny, tiny_path, lone):
    """What holds on this CPU build (docs/python.md, "Exactness"): requests running together share
    batches (their prompt pages and decode steps go to llama.cpp in one call, as in
    llama-server), whose shapes move logits a little; so a greedy answer computed beside
    others equals the sequential one, or leaves it where the sequential path had a near
    tie. A cache that held wrong cells would leave it at a clear choice."""
    jobs = [QUESTIONS[(t + k) % len(QUESTIONS)] for t in range(8) for k in range(3)]
    peak = [0]

    def ask(q: str) -> tuple[str, Answer]:
        peak[0] = max(peak[0], tiny.get_model_info()["scheduler"]["running"])
        return q, tiny.answer(q, **SHORT)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(ask, jobs))
    assert len(results) == 24 and peak[0] >= 2
    assert all(a.finish_reason in ("stop", "length") and a.text for _, a in results)
    check_against_lone_answers(tiny, tiny_path, lone, results)


def _ids(answer: Answer) -> tuple[int, ...]:
    """An answer's tokens, with END where it stopped: one that stopped where the other went on
    is a difference like any other."""
    return tuple(answer.token_ids) + ((END,) if answer.finish_reason == "stop" else ())


def check_against_lone_answers(svc: LLMService, model: Path, single: dict[str, Answer],
                              results: list[tuple[str, Answer]]) -> None:
    """Each answer equals the sequential one to its question, or leaves it at a near tie.

    Equal answers hold at once; each distinct difference is checked once (the same question
    often leaves its lone answer the same way twice), and the reference model is loaded only
    when there is one to check."""
    cases: dict[tuple[tuple[int, ...], ...], None] = {}
    for q, a in results:
        prompt = svc._engine.prompts.build([Turn("user", q)], svc.generation_config).tokens
        assert len(prompt) == a.timings.n_prompt
        lone, other = _ids(single[q]), _ids(a)
        if lone != other:
            cases[(tuple(prompt), lone, other)] = None
    print(f"{len(cases)} distinct differences among {len(results)} answers")
    if cases:
        near_ties(model, list(cases))


def test_concurrent_requests_all_finish_with_eight_slots(default_gguf):
    with LLMService(default_gguf, max_length=512, n_parallel=8) as svc:
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda q: svc.answer(q, **GREEDY), QUESTIONS))
    assert all(a.finish_reason in ("stop", "length") and a.text for a in answers)
    assert "Paris" in answers[0].text


def test_async_streaming_matches_blocking_answer(service):
    q = QUESTIONS[0]
    expected = service.generate_answer(q, **GREEDY)

    async def collect() -> str:
        return "".join([t async for t in service.generate_answer_with_streaming(q, **GREEDY)])

    assert asyncio.run(collect()) == expected


def test_async_tasks_run_together(tiny, tiny_path, lone):
    async def main() -> list[Answer]:
        return await asyncio.gather(*(tiny.aanswer(q, **SHORT) for q in QUESTIONS[:4]))

    answers = asyncio.run(main())
    assert all(a.text and a.finish_reason in ("stop", "length") for a in answers)
    check_against_lone_answers(tiny, tiny_path, lone,
                               list(zip(QUESTIONS[:4], answers, strict=True)))


def test_cancelled_async_stream_frees_the_model(tiny):
    expected = tiny.generate_answer(QUESTIONS[1], **SHORT)
    tiny.clear_kv_cache()
    seen = 0

    async def main() -> None:
        nonlocal seen

        async def consume() -> None:
            nonlocal seen
            async for _ in tiny.astream("List the first fifty prime numbers.", temperature=0.0,
                                        max_tokens=500):
                seen += 1
                if seen == 3:
                    started.set()

        started = asyncio.Event()
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(wait_idle, tiny)
        assert (await tiny.aanswer(QUESTIONS[1], **SHORT)).text == expected

    asyncio.run(main())
    assert seen >= 3


def test_broken_async_for_stops_decoding(tiny):
    tiny.clear_kv_cache()

    async def main() -> int:
        n = 0
        chunks = tiny.astream("Count from one to one hundred.", temperature=0.0,
                              max_tokens=300)
        async for _chunk in chunks:
            n += 1
            if n == 2:
                break
        await chunks.aclose()
        await asyncio.to_thread(wait_idle, tiny)
        return n

    assert asyncio.run(main()) == 2
    # stopped long before 300 tokens
    assert generated_in_cache(tiny, "Count from one to one hundred.") < 30
    assert tiny.generate_answer(QUESTIONS[0], **SHORT)


@pytest.mark.parametrize("params", [
    {"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": -1.0},
    {"max_tokens": 0}, {"max_tokens": -1}, {"top_p": 0.0}, {"top_k": -2},
    {"max_tokens": 10**6}, {"bogus": True},
])
def test_bad_parameters_raise_before_native_code(service, params):
    with pytest.raises(InvalidParameterError):
        service.generate_answer("What is 2+2?", **params)


@pytest.mark.parametrize("question", ["", "   ", None, 42])
def test_bad_question_is_rejected(service, question):
    with pytest.raises(InvalidParameterError):
        service.generate_answer(question)


def test_context_too_long_reports_its_numbers(service):
    context = "word " * 3000
    with pytest.raises(ContextLengthExceededError) as err:
        service.generate_answer("Summarize.", context, max_tokens=16)
    assert err.value.n_ctx == 1024 and err.value.n_prompt > 1024
    assert err.value.max_tokens == 16
    assert service.generate_answer(QUESTIONS[0], **GREEDY)  # still usable


def test_update_generation_config_validates_and_applies(tiny):
    before = tiny.generation_config
    try:
        cfg = tiny.update_generation_config(temperature=0.0, top_k=1, max_tokens=8)
        assert (cfg.temperature, cfg.top_k, cfg.max_tokens) == (0.0, 1, 8)
        with pytest.raises(InvalidParameterError):
            tiny.update_generation_config(temperature=float("nan"))
        with pytest.raises(InvalidParameterError):
            tiny.update_generation_config(nonsense=1)
        assert tiny.generation_config == cfg
        assert tiny.answer("Why is the sky blue?").timings.n_generated <= 8
    finally:
        tiny._generation = before


def test_model_info_has_the_seed_keys(service, default_gguf):
    info = service.get_model_info()
    for key in ("model_name", "model_path", "architecture", "quantization", "n_ctx",
                "n_gpu_layers", "device", "gpu_name", "gpu_memory_total", "gpu_memory_allocated"):
        assert key in info
    assert info["model_path"] == str(default_gguf)
    assert info["architecture"] == "gemma3" and info["quantization"] == "Q4_K_M"
    assert info["n_ctx"] == 1024 and info["device"] == "cpu"
    assert info["gpu_memory_total"] == 0.0 and info["gpu_memory_allocated"] == 0.0


def test_clear_gpu_cache_keeps_results(tiny):
    expected = tiny.generate_answer(QUESTIONS[2], **SHORT)
    tiny.clear_gpu_cache()
    assert tiny.generate_answer(QUESTIONS[2], **SHORT) == expected


DOCUMENT = ("The Zorblat festival is held every spring in the town of Quenby, on the river "
            "Wendle. It began in 1872 when the miller Ada Fenwick baked a loaf the size of a "
            "cartwheel. Today visitors race wooden boats, eat plum cake and crown a Bread "
            "Queen, and the town's brass band plays until midnight on the old stone bridge. ") * 2


def test_second_call_reuses_the_cached_prefix(tiny):
    tiny.clear_gpu_cache()
    # what is reused is the prompt: the answers need not be long
    first = tiny.answer("Where is the festival held?", DOCUMENT, temperature=0.0, max_tokens=4)
    second = tiny.answer("Who baked the first loaf?", DOCUMENT, temperature=0.0, max_tokens=4)
    assert first.timings.n_cached == 0
    # the shared document is reused (KV_REUSE=fast, the default: every matching token;
    # tests/test_engine_cache.py holds exact's whole pages)
    assert second.timings.n_cached >= 64
    assert second.timings.n_cached < second.timings.n_prompt
    kv = tiny.get_model_info()["kv_cache"]
    assert kv["hits"] >= 1 and kv["tokens_reused"] >= second.timings.n_cached


def test_context_managers_and_independent_instances(default_gguf):
    with LLMService(default_gguf, max_length=256) as a, LLMService(default_gguf,
                                                                   max_length=512) as b:
        assert a.get_model_info()["n_ctx"] == 256 and b.get_model_info()["n_ctx"] == 512
        assert a.generate_answer(QUESTIONS[0], **GREEDY) == b.generate_answer(QUESTIONS[0],
                                                                              **GREEDY)
    assert not a.is_loaded and not b.is_loaded
    # leaving the block closed them (close() after a load): a closed service raises
    with pytest.raises(ServiceClosedError):
        a.generate_answer("hi")
    with pytest.raises(ServiceClosedError):
        a.load()


def test_load_reports_progress_and_can_be_cancelled(default_gguf):
    svc = LLMService(default_gguf, max_length=256)
    with pytest.raises(LoadCancelledError):
        svc.load(progress=lambda f: False)
    assert not svc.is_loaded

    # what was test_cancel_load_from_another_thread, on the same instance
    started = threading.Event()

    def progress(fraction: float) -> bool:
        started.set()
        svc.cancel_load()
        return True

    with pytest.raises(LoadCancelledError):
        svc.load(progress=progress)
    assert started.is_set() and not svc.is_loaded

    seen: list[float] = []
    svc.load(progress=lambda f: seen.append(f) or True)  # a later load works, and reports
    assert svc.is_loaded
    assert seen and seen[-1] == pytest.approx(1.0) and seen == sorted(seen)
    svc.close()


def test_load_model_does_not_block_the_event_loop(default_gguf):
    async def main() -> tuple[int, str, LLMService]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        async with LLMService(default_gguf, max_length=256) as c:  # awaits load_model()
            t.cancel()
            assert c.is_loaded
            answer = await asyncio.to_thread(c.generate_answer, QUESTIONS[0], **GREEDY)
        return ticks, answer, c

    ticks, answer, c = asyncio.run(main())
    assert ticks > 1  # the loop kept running during the load
    assert "Paris" in answer
    assert not c.is_loaded  # async with unloads (cleanup())


def test_optimize_for_gpu_picks_the_file_of_the_folder(tmp_path: Path, default_gguf):
    for name in ("tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf", "tiny-F16.gguf"):
        (tmp_path / name).symlink_to(default_gguf)
    svc = LLMService(tmp_path, max_length=256)
    svc.optimize_for_gpu(use_quantization=True, load_in_8bit=True, load_in_4bit=False)
    svc.load()
    assert svc.get_model_info()["model_path"].endswith("tiny-Q8_0.gguf")
    svc.optimize_for_gpu(load_in_4bit=True)
    assert not svc.is_loaded  # the choice changed: reloaded at the next call
    svc.generate_answer("hi", max_tokens=2)
    assert svc.get_model_info()["model_path"].endswith("tiny-Q4_K_M.gguf")
    svc.optimize_for_gpu(use_quantization=False)
    svc.load()
    info = svc.get_model_info()
    # the widest name wins the choice, but the quantization is the file's own (a renamed
    # Q4_K_M is still Q4_K_M: general.file_type 15)
    assert info["model_path"].endswith("tiny-F16.gguf") and info["quantization"] == "Q4_K_M"
    svc.close()


def test_stop_strings_cut_the_answer(service):
    # both runs start from an empty pool: a greedy answer may change with where its cells sit
    # in the shared KV pool (see docs/python.md, Concurrency and the KV cache)
    service.clear_kv_cache()
    full = service.generate_answer("Why is the sky blue?", **GREEDY)
    service.clear_kv_cache()
    words = full.split()
    assert len(words) >= 3, full
    stop = f" {words[2]}"  # a word inside the greedy answer, whatever the prompt's wording
    cut = service.answer("Why is the sky blue?", stop=(stop,), **GREEDY)
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_cancel_load_before_the_load_starts_is_not_lost(default_gguf):
    svc = LLMService(default_gguf, max_length=256)
    svc.cancel_load()
    with pytest.raises(LoadCancelledError):
        svc.load()
    assert not svc.is_loaded
    svc.load()  # the cancel was consumed by the load it stopped
    assert svc.is_loaded
    svc.close()


def test_raw_completion_continues_the_text_as_it_is(service):
    text = "The capital of France is"
    service.clear_kv_cache()
    done = Answer.from_chunks(service.complete_stream(text, temperature=0.0, max_tokens=4))
    assert done.text.strip() and done.text.startswith(" ")  # a continuation keeps its space
    # the prompt is the text's own tokens after the BOS: no frame, no turns
    assert done.timings.n_prompt == len(service._engine.tokenize(text)) + 1
    with pytest.raises(InvalidParameterError):
        service.complete_stream("", max_tokens=4)


def _check_model_info(info: dict, path: Path) -> None:
    """What every get_model_info() answer holds, whatever the load state at that moment."""
    assert isinstance(info["loaded"], bool) and isinstance(info["n_ctx"], int)
    assert info["engine"]["state"] in ("ok", "reloading", "failed")
    if not info["loaded"]:
        return
    assert info["model_path"] == str(path) and isinstance(info["model_name"], str)
    assert isinstance(info["n_params"], int) and info["n_params"] > 0
    kv, sched = info["kv_cache"], info["scheduler"]
    assert kv["n_ctx"] == 256 and kv["n_swa"] > 0 and 0 <= kv["tokens_in_use"] <= kv["n_ctx_pool"]
    assert 0 <= kv["prefixes_in_slots"] <= kv["n_parallel"]
    assert all(isinstance(sched[k], int) and sched[k] >= 0 for k in ("running", "waiting"))


def test_model_info_stays_well_formed_while_the_model_loads_and_unloads(default_gguf):
    """get_model_info() from one thread while another loads and unloads the model and a third
    asks questions: it never raises, crashes the process or answers a half-built dict
    (every native read is under the engine's lock; what the scheduler mutates is snapshotted)."""
    svc = LLMService(default_gguf, max_length=256)
    stop, errors, seen = threading.Event(), [], {"loaded": 0, "unloaded": 0}

    def hammer() -> None:
        while not stop.is_set():
            try:
                info = svc.get_model_info()
                _check_model_info(info, default_gguf)
                seen["loaded" if info["loaded"] else "unloaded"] += 1
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                stop.set()

    def ask() -> None:
        while not stop.is_set():
            try:
                svc.generate_answer("Why is the sky blue?", max_tokens=4)
            except ServiceClosedError:  # unloaded under it: expected
                pass
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                stop.set()

    threads = [threading.Thread(target=hammer), threading.Thread(target=ask)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads every few bytecodes: races show sooner
    for t in threads:
        t.start()
    # two cycles: a load and an unload under fire, then a reload after an unload (each cycle
    # under a 1 us switch interval: ~2.5-5 s); the race of an unload in the middle of a read
    # is made deterministic in test_model_info_when_an_unload_lands_in_the_middle
    deadline = time.monotonic() + 10
    try:
        for _ in range(2):
            if stop.is_set() or time.monotonic() > deadline:
                break
            svc.load()
            time.sleep(0.05)
            svc.unload()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        sys.setswitchinterval(switch)
        svc.close()
    assert not errors, repr(errors[0])
    assert seen["loaded"] and seen["unloaded"]


def test_model_info_when_an_unload_lands_in_the_middle(default_gguf, monkeypatch):
    """An unload from another thread between two of get_model_info()'s reads of the model
    (here: right after the parameter count): the answer says "not loaded", never raises."""
    from ggufllm.engine import Engine

    svc = LLMService(default_gguf, max_length=256)
    svc.load()
    facts = Engine.model_facts

    def facts_then_unload(engine: Engine) -> dict[str, int]:
        out = facts(engine)
        unloader = threading.Thread(target=svc.unload)  # frees the model's native memory
        unloader.start()
        unloader.join()
        return out

    monkeypatch.setattr(Engine, "model_facts", facts_then_unload)
    try:
        info = svc.get_model_info()
    finally:
        svc.close()
    assert info["loaded"] is False


def test_model_info_reads_the_slots_while_the_scheduler_changes_them(default_gguf):
    """Fault injection: a thread shares and unshares slot prefixes as the scheduler does on
    placement, while get_model_info() counts the cells in use; switching threads every few
    bytecodes makes an unguarded read of those dicts fail at once."""
    svc = LLMService(default_gguf, max_length=256, n_parallel=4)
    svc.load()
    slots = svc._engine.slots.slots
    for i, slot in enumerate(slots):  # what four placed prompts would leave (no request runs)
        slot.tokens = list(range(64 * (i + 1)))
    stop, errors = threading.Event(), []

    def scheduler_like() -> None:
        while not stop.is_set():
            for a in slots:
                for b in slots:
                    a.share(b, 64)
            for a in slots:
                for b in slots:
                    a.share(b, 0)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    mutator = threading.Thread(target=scheduler_like)
    mutator.start()
    try:
        # an unguarded read fails within ~0.6 s on average here (2.6 s at most in 15 runs)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not errors:
            try:
                kv = svc.get_model_info()["kv_cache"]
                assert 64 * 4 <= kv["tokens_in_use"] <= 64 * (1 + 2 + 3 + 4), kv
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
    finally:
        stop.set()
        mutator.join()
        sys.setswitchinterval(switch)
        for slot in slots:
            slot.replace([], 0)
        svc.close()
    assert not errors, repr(errors[0])


def test_optimize_for_gpu_during_a_load_is_not_lost(tmp_path: Path, default_gguf):
    """A choice made while a load is under way applies to the model that load leaves:
    optimize_for_gpu waits for it (the load lock), then unloads what no longer fits."""
    for name in ("tiny-Q8_0.gguf", "tiny-F16.gguf"):
        (tmp_path / name).symlink_to(default_gguf)
    svc = LLMService(tmp_path, max_length=256)
    svc.optimize_for_gpu(use_quantization=False)  # the F16 file
    loading, release = threading.Event(), threading.Event()

    def held(fraction: float) -> bool:  # holds the load open until the choice was made
        loading.set()
        return release.wait(30)

    loader = threading.Thread(target=svc.load, kwargs={"progress": held})
    loader.start()
    assert loading.wait(30)
    chooser = threading.Thread(target=svc.optimize_for_gpu,
                               kwargs={"use_quantization": True, "load_in_8bit": True})
    chooser.start()
    chooser.join(0.5)  # returns at once without the lock; waits for the load with it
    release.set()
    loader.join(60)
    chooser.join(60)
    try:
        svc.load()
        assert svc.get_model_info()["model_path"].endswith("tiny-Q8_0.gguf")
    finally:
        svc.close()
