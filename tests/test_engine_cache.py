"""The KV cache with KV_REUSE=exact: a cached answer equals the cold one, overflow policies,
cache types, sampling.

Where an answer through the cache is said to equal the cold one token for token, the engine
feeds every token in the cold run's batch and cell (one document in the pool, a full-size
window cache), and llama.cpp's kernels are deterministic (tests/test_engine_invariance.py):
that holds on every CPU. Where the cells lie elsewhere (two documents in the pool, a
window-sized cache, a prefix shared with a running request), only rounding differs, and
the answer equals the cold one or leaves it at a near tie (tests/near_tie.py).

Gemma 3 270M, the default model, holds the promises about its answers: a cache hit equals
the cold answer, a quantized cache answers (and one without flash attention is refused),
the repetition penalty sees the prompt. The tiny gpt-oss fixture (random weights, a window
of 8 tokens; a prompt costs next to nothing) holds a cache hit past its window, and the
engine's mechanics, whatever the model: two slots, a prefix shared with a running request,
the overflow policies, seeds and top-k, the cache's size. Its answers are arbitrary
tokens, so only equalities, counts and errors are asserted on them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from ggufllm import ConfigError, ContextLengthExceededError, LLMService, Turn
from ggufllm.engine.fit import RagQuestion
from ggufllm.kvlayout import KVLayout, kv_cache_bytes

from .kv_context import KVSizeLog
from .near_tie import assert_equal_or_near_ties as near_ties
from .test_service import wait_idle

GREEDY = dict(temperature=0.0, max_tokens=24)
# how an answer of the tiny model may end: by an end token of its own (random weights may
# pick <|call|>, a tool call), or by its budget
FINISHED = ("stop", "tool_call", "length")


@pytest.fixture(scope="module", autouse=True)
def _exact_reuse() -> Iterator[None]:
    """This module holds KV_REUSE=exact's promises (tests/test_kv_reuse.py holds the default,
    fast); autouse, so it is set before the module's service loads."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KV_REUSE", "exact")
        yield

FESTIVAL = ("The Zorblat festival is held every spring in the town of Quenby, on the river "
            "Wendle. It began in 1872 when the miller Ada Fenwick baked a loaf the size of a "
            "cartwheel. Today visitors race wooden boats, eat plum cake and crown a Bread "
            "Queen, and the brass band plays until midnight on the old stone bridge. ")
VOLCANO = ("Mount Perrin is a volcano on the island of Tessaly. It last erupted in 1911, and "
           "its crater holds a green lake where flamingos nest. Farmers on its slopes grow "
           "coffee and lemons, and a narrow railway climbs to the rim every morning at seven. ")
DOC_A, DOC_B = FESTIVAL * 3, VOLCANO * 3  # ~330 prompt tokens each on gpt-oss
# Gemma: prompts of ~210 tokens, whose ~200 shared ones make three whole 64-token pages
# (each prompt token costs ~5 ms on one core)
GEMMA_DOC = FESTIVAL * 2
QUESTIONS_A = ["Where is the festival held?", "Who baked the first loaf?"]


def cold(svc: LLMService, question: str, context: str | None, **params) -> tuple[int, ...]:
    svc.clear_kv_cache()
    answer = svc.answer(question, context, **{**GREEDY, **params})
    assert answer.timings.n_cached == 0
    return answer.token_ids


@pytest.fixture(scope="module")
def tiny_and_kv_sizes(tiny_gguf) -> Iterator[tuple[LLMService, list[float]]]:
    """The tiny gpt-oss fixture in two slots, shared by the mechanics tests below, and the
    sizes (MiB) of the KV caches llama.cpp logged while it loaded."""
    log = logging.getLogger("ggufllm.llama_cpp")
    handler, level = KVSizeLog(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    svc = LLMService(tiny_gguf("q8_0"), max_length=1024, n_parallel=2)
    try:
        svc.load()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert svc.get_model_info()["kv_cache"]["reuse"] == "exact"  # set before it loaded
    yield svc, [mib for mib, _, _ in handler.sizes]
    svc.close()


@pytest.fixture(scope="module")
def tiny(tiny_and_kv_sizes) -> LLMService:
    return tiny_and_kv_sizes[0]


def test_cache_hit_equals_cold_answer(service):
    expected = {q: cold(service, q, GEMMA_DOC) for q in QUESTIONS_A}
    # the slot now holds the last cold run's prompt: each question in turn reuses GEMMA_DOC
    # from the one asked before it (the first from the cold run of the last)
    for q in QUESTIONS_A:
        warm = service.answer(q, GEMMA_DOC, **GREEDY)
        assert warm.timings.n_cached >= 128
        assert warm.token_ids == expected[q]


def test_cache_hit_after_a_slot_switch(tiny, tiny_gguf):
    """Two documents in two slots of one pool. Token equality with the cold answer is not
    promised here: ggml-cpu's attention kernels split their work by cell index (tiles for
    prompt rows, thread chunks for one-row decodes past 512 cells), so an answer depends on
    where its cells lie in the shared pool, which another cached document changes (docs/python.md,
    "Exactness"; measured on Gemma 3 270M: A's answer equal, B's first token not). What
    holds: each answer equals the cold one or leaves it at a near tie (tests/near_tie.py)."""
    svc = tiny
    questions = [("Who baked the first loaf?", DOC_A), ("When did it last erupt?", DOC_B)]
    expected = [cold(svc, q, doc) for q, doc in questions]
    hits = svc.get_model_info()["kv_cache"]["hits"]
    # the pool holds DOC_B from its cold run; DOC_A goes to the other slot
    svc.answer("What is this text about?", DOC_A, **GREEDY)
    a, b = (svc.answer(q, doc, **GREEDY) for q, doc in questions)
    assert a.timings.n_cached >= 128 and b.timings.n_cached >= 128
    assert a.timings.n_generated and b.timings.n_generated
    assert {a.finish_reason, b.finish_reason} <= set(FINISHED)
    kv = svc.get_model_info()["kv_cache"]
    assert kv["prefixes_in_slots"] == 2 and kv["hits"] - hits >= 2
    cases = []
    for (q, doc), answer, alone in zip(questions, (a, b), expected, strict=True):
        prompt = svc._prepare([], dict(GREEDY), None, svc._rag(q, doc))[1].tokens
        assert len(prompt) == answer.timings.n_prompt
        cases.append((prompt, alone, answer.token_ids))
    near_ties(tiny_gguf("q8_0"), cases)


SHARED_Q = "Who baked the first loaf?"


@pytest.fixture(scope="module")
def shared_with_running(tiny):
    """A question over DOC_A asked while a request over DOC_A is still generating, as the
    two tests below look at it: (its cold answer, the answer beside the running request,
    the tokens the slots hold once both ended, the kv_cache info then)."""
    expected = cold(tiny, SHARED_Q, DOC_A)
    tiny.clear_kv_cache()
    # a budget of most of the window: it runs for ~2 s on the tiny model
    running = tiny.stream("What is this text about?", DOC_A, temperature=0.0,
                          max_tokens=600)
    next(running)  # its prompt is in the cache; it is still generating
    shared = tiny.answer(SHARED_Q, DOC_A, **GREEDY)
    assert [s.busy for s in tiny._engine.slots.slots].count(True) == 1  # still running
    running.close()
    wait_idle(tiny)
    held = sum(len(s.tokens) for s in tiny._engine.slots.slots)
    return expected, shared, held, tiny.get_model_info()["kv_cache"]


def test_prefix_held_by_a_running_request_is_shared(tiny, shared_with_running, tiny_gguf):
    expected, shared, _, _ = shared_with_running
    assert shared.timings.n_cached >= 128  # copied from the busy slot (llama_memory_seq_cp)
    # the question's tokens share a batch with the running request's decode row: equal
    # (as measured in every run so far) or apart at a near tie
    prompt = tiny._prepare([], dict(GREEDY), None, tiny._rag(SHARED_Q, DOC_A))[1].tokens
    near_ties(tiny_gguf("q8_0"), [(prompt, expected, shared.token_ids)])


def test_tokens_in_use_counts_a_shared_prefix_once(tiny, shared_with_running):
    _, shared, held, kv = shared_with_running
    assert shared.timings.n_cached >= 128
    assert kv["tokens_in_use"] == held - shared.timings.n_cached
    tiny.clear_kv_cache()
    assert tiny.get_model_info()["kv_cache"]["tokens_in_use"] == 0


def test_tiny_gpt_oss_cache_hit_equals_cold_answer(tiny):
    """gpt-oss's sliding-window layers: a prompt much longer than the window."""
    svc = tiny
    n_swa = svc.get_model_info()["kv_cache"]["n_swa"]
    assert 0 < n_swa < 200
    doc = DOC_A + DOC_B
    params = dict(temperature=0.0, max_tokens=16)
    expected = cold(svc, "Who baked the first loaf?", doc, **params)
    svc.clear_kv_cache()
    first = svc.answer("What is this about?", doc, **params)
    assert first.timings.n_prompt > 3 * n_swa
    warm = svc.answer("Who baked the first loaf?", doc, **params)
    assert warm.timings.n_cached >= 2 * n_swa
    assert warm.token_ids == expected


def test_tiny_gpt_oss_window_sized_cache_never_reuses_a_dropped_window(tiny_gguf):
    """SWA_FULL=false: the windowed layers keep only a few hundred cells, so after a long
    prompt the oldest positions are gone from them. A prefix cut back close to the end
    (the window there is still cached) is reused; one cut back before the oldest cell the
    next token needs must be evaluated again (llama-server's pos_min check).

    The window cells form a ring whose next free cell depends on what it held before: the
    reused prefix's last page lands at other cells than in the cold run (here from cell 0,
    where the cold run put it from cell 192), and the attention adds the same window in
    another order. So that answer equals the cold one or leaves it at a near tie (docs/python.md,
    "Exactness"; ``benchmarks/kv_layout.py``). The prompt evaluated again starts from an
    empty ring, in the cold run's batches and cells: that answer equals the cold one token
    for token."""
    # n_batch 64: the window cache holds pad256(n_swa + 64) = 256 cells, half the prompt
    path = tiny_gguf("q8_0")
    svc = LLMService(path, max_length=1024, n_parallel=1, swa_full=False, n_batch=64)
    try:
        svc.load()
        q, params = "Who baked the first loaf?", dict(temperature=0.0, max_tokens=16)
        long_doc, other_doc = DOC_A + DOC_B, DOC_A + DOC_A
        expected_long, expected_other = cold(svc, q, long_doc, **params), \
            cold(svc, q, other_doc, **params)
        svc.clear_kv_cache()
        svc.answer("What is this about?", long_doc, **params)
        near = svc.answer(q, long_doc, **params)  # cut back near the end: window still there
        assert near.timings.n_cached >= 256 and near.text
        far = svc.answer(q, other_doc, **params)  # shares only DOC_A: cut back too far
        kv = svc.get_model_info()["kv_cache"]
        assert kv["swa_full"] is False and kv["window_resets"] >= 1
        assert far.timings.n_cached == 0 and far.token_ids == expected_other
        prompt = svc._prepare([], dict(params), None, svc._rag(q, long_doc))[1].tokens
        assert len(prompt) == near.timings.n_prompt
    finally:
        svc.close()
    near_ties(path, [(prompt, expected_long, near.token_ids)], "reused window prefixes")


# -- overflow -------------------------------------------------------------------


# a window a short prompt overflows, on the tiny model: 160 tokens (gpt-oss's system and
# developer messages take ~100 of them; an answer that fills it decodes ~55 tokens)
TIGHT = 160


@pytest.fixture(scope="module")
def tight(tiny_gguf) -> Iterator[LLMService]:
    svc = LLMService(tiny_gguf("q8_0"), max_length=TIGHT, n_parallel=1)
    svc.load()
    yield svc
    svc.close()


def prompt_len(svc: LLMService, question: str, context: str | None = None) -> int:
    turn = RagQuestion(question, context).turn(context)
    return len(svc._engine.build([turn], svc.generation_config).tokens)


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_overflow_at_the_window_edge(tight, delta):
    n_prompt = prompt_len(tight, "Tell me a long story.")
    budget = tight.get_model_info()["n_ctx"] - n_prompt + delta  # prompt + budget = n_ctx + delta
    if delta <= 0:
        answer = tight.answer("Tell me a long story.", temperature=0.0, max_tokens=budget)
        assert answer.finish_reason in FINISHED
        assert answer.timings.n_generated <= budget
    else:
        with pytest.raises(ContextLengthExceededError) as err:
            tight.answer("Tell me a long story.", temperature=0.0, max_tokens=budget)
        assert (err.value.n_prompt, err.value.n_ctx, err.value.max_tokens) == (n_prompt, TIGHT,
                                                                                budget)


def test_shrink_max_tokens_lowers_the_budget(tight, caplog):
    # the window caps any answer at TIGHT - n_prompt whatever the budget, so what shows the
    # budget was lowered (and not refused, nor lowered further) is the budget itself: the
    # warning names it and an answer long enough to use it all stops exactly there
    question = "List the first hundred prime numbers."
    n_prompt = prompt_len(tight, question)
    with caplog.at_level(logging.WARNING, logger="ggufllm"):
        answer = tight.answer(question, temperature=0.0, max_tokens=250,
                              overflow="shrink_max_tokens")
    assert any(f"leaves room for {TIGHT - n_prompt} of the 250 tokens" in r.getMessage()
               for r in caplog.records)
    room = TIGHT - n_prompt
    if answer.finish_reason == "length":
        assert answer.timings.n_generated == room
    else:  # where this CPU's greedy answer ends by itself first, the warning alone shows it
        assert answer.finish_reason in FINISHED and answer.timings.n_generated < room, answer


def test_truncate_context_keeps_the_question(tight, caplog):
    context = DOC_A  # ~230 tokens for a 160-token window
    tight.clear_kv_cache()  # the first answer is a cold one
    with pytest.raises(ContextLengthExceededError):
        tight.answer("Where is the festival held?", context, **GREEDY)
    with caplog.at_level(logging.WARNING, logger="ggufllm"):
        answer = tight.answer("Where is the festival held?", context, overflow="truncate_context",
                              **GREEDY)
    assert answer.timings.n_prompt + GREEDY["max_tokens"] <= TIGHT
    assert any("tokens dropped" in r.getMessage() for r in caplog.records)
    # the trimmed prompt is cached like any other: a second call equals the cold first one
    again = tight.answer("Where is the festival held?", context, overflow="truncate_context",
                         **GREEDY)
    assert answer.timings.n_cached == 0
    assert again.timings.n_cached > 0 and again.token_ids == answer.token_ids


def test_truncate_context_without_context_still_raises(tight):
    with pytest.raises(ContextLengthExceededError):
        tight.answer("word " * 400, overflow="truncate_context", max_tokens=8)


def test_drop_oldest_turns_keeps_a_long_chat_alive(tight):
    turns = []
    for i in range(12):
        turns += [Turn("user", f"Tell me fact number {i} about the sea, in detail please."),
                  Turn("assistant", "The sea is deep and wide and full of fish. " * 2)]
    turns.append(Turn("user", "And the last fact?"))
    with pytest.raises(ContextLengthExceededError):
        list(tight.chat_stream(turns, **GREEDY))
    chunks = list(tight.chat_stream(turns, overflow="drop_oldest_turns", **GREEDY))
    assert chunks[-1].finish_reason in FINISHED


# -- cache types and memory -------------------------------------------------------------


def test_kv_bytes_match_llama_cpp(tiny_and_kv_sizes):
    svc, sizes = tiny_and_kv_sizes
    info = svc.get_model_info()["kv_cache"]
    assert sizes, "llama.cpp did not log its KV cache size"
    assert info["bytes"] == pytest.approx(sum(sizes) * 2**20, rel=1e-3)
    assert info["n_ctx_pool"] == 2048 and info["n_parallel"] == 2


def test_kv_bytes_of_each_cache_mode():
    layout = KVLayout.gpt_oss_20b()
    four = dict(n_ctx=16384, n_seq=4, n_ubatch=512)
    full = kv_cache_bytes(layout, kv_type="f16", swa_full=True, **four)
    window = kv_cache_bytes(layout, kv_type="f16", swa_full=False, **four)
    assert full.total == 24 * 16384 * 8 * 128 * 2  # 768 MiB for 4 x 4096 tokens
    assert window.swa_cells == 1024
    assert window.total == 12 * (16384 + 1024) * 8 * 128 * 2
    q8 = kv_cache_bytes(layout, kv_type="q8_0", swa_full=True, **four)
    assert q8.total == full.total * 34 // 64


def test_quantized_kv_cache_answers(default_gguf):
    svc = LLMService(default_gguf, max_length=512, n_parallel=1, kv_cache_type="q8_0")
    try:
        assert "Paris" in svc.generate_answer("What is the capital of France?", **GREEDY)
        assert svc.get_model_info()["kv_cache"]["type"] == "q8_0"
    finally:
        svc.close()


def test_quantized_kv_cache_without_flash_attention_is_a_clear_error(default_gguf):
    svc = LLMService(default_gguf, max_length=512, kv_cache_type="q4_0", flash_attn=False)
    with pytest.raises(ConfigError, match="flash attention"):
        svc.load()
    assert not svc.is_loaded


# -- sampling ---------------------------------------------------------------------------


def test_seed_reproduces_a_sampled_answer(tiny):
    params = dict(temperature=1.0, top_k=0, top_p=1.0, max_tokens=12)
    q = "Tell me a story."
    a = tiny.answer(q, seed=1234, **params).token_ids
    assert tiny.answer(q, seed=1234, **params).token_ids == a
    assert any(tiny.answer(q, seed=s, **params).token_ids != a for s in (1, 2, 3))


def test_top_k_one_equals_greedy(tiny):
    # both cold from an empty pool: what other slots hold moves logits (docs/python.md, "Exactness")
    q = "Why is the sky blue?"
    greedy = cold(tiny, q, None)
    tiny.clear_kv_cache()
    assert tiny.answer(q, temperature=0.8, top_k=1, seed=7, max_tokens=24).token_ids == greedy


def test_repeat_penalty_sees_the_prompt(service):
    # Gemma: a random-weight model's first answer token is next to never in its prompt
    context = "The capital of France is Paris."
    plain = service.answer("What is the capital of France?", context, **GREEDY)
    first = plain.token_ids[0]
    assert "Paris" in plain.text
    # the first answer token is in the prompt: a strong penalty must avoid it
    penalized = service.answer("What is the capital of France?", context, repeat_penalty=10.0,
                               temperature=0.0, max_tokens=1)
    assert penalized.token_ids[0] != first
