"""KV_REUSE=fast, the default: documents asked in turn reuse their cached prefix past the
sliding window (from a slot, from the RAM cache through window checkpoints, from a file
saved by another service), and a greedy answer through the cache equals the cold one or
leaves it only at a near tie (``tests/near_tie.py``). KV_REUSE=exact keeps its promise:
only what restores exactly is reused (``tests/test_kvcache_service.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufllm import KVCacheMismatchError, LLMService
from ggufllm.engine.prompt import Prompt

from .near_tie import END
from .near_tie import assert_equal_or_near_ties as near_ties

GREEDY = dict(temperature=0.0, max_tokens=12)
FACTS = [
    "The Zorblat festival is held every spring in the town of Quenby, on the river Wendle.",
    "Mount Ferrow is the tallest peak of the Ulm range, at 4,210 metres above the sea.",
    "The Velloran Library keeps nine thousand maps of coasts that no longer exist today.",
]
QUESTIONS = [("Where is it?", "Who goes there?"), ("How tall is it?", "Who climbed it?"),
             ("What does it keep?", "Who founded it?")]
# Gemma: 28 repeats make prompts of ~700 tokens, past its window of 512 and the 128 tokens
# of margin three_documents_in_turn asks for (each prompt token costs ~10 ms on one core)
GEMMA_REPEATS = 28


def document(i: int, n_repeats: int) -> str:
    return " ".join([FACTS[i]] * n_repeats)


def prompt_of(svc: LLMService, question: str, context: str) -> Prompt:
    _, prompt, _ = svc._prepare([], dict(GREEDY), None, svc._rag(question, context))
    return prompt


def ask(svc: LLMService, question: str, context: str) -> tuple[list[int], list[int], int]:
    """(prompt tokens, answer tokens with END when it stopped, cached prompt tokens)."""
    prompt = prompt_of(svc, question, context)
    answer = svc.answer(question, context, **GREEDY)
    ids = list(answer.token_ids) + ([END] if answer.finish_reason == "stop" else [])
    return list(prompt.tokens), ids, answer.timings.n_cached


def documents_in_turn(svc: LLMService, n_repeats: int, n_swa: int,
                      up_to_the_question: bool = False) -> list[tuple]:
    """A B C, then A B C with other questions; returns
    (question, doc, prompt, ids, cached) of the follow-ups, each of which must have reused
    its document past the window (with ``up_to_the_question``: all of its prompt before
    the question)."""
    docs = [document(i, n_repeats) for i in range(len(FACTS))]
    for i, doc in enumerate(docs):
        prompt, _, _ = ask(svc, QUESTIONS[i][0], doc)
        assert len(prompt) > n_swa + 128  # past the window: checkpoints or nothing
    follow_ups = []
    for i, doc in enumerate(docs):
        question = QUESTIONS[i][1]
        prompt, ids, cached = ask(svc, question, doc)
        # the whole document and what precedes it, short of the question's tail
        assert cached >= len(prompt) - 4 * 64 and cached > n_swa, (i, cached, len(prompt))
        if up_to_the_question:
            assert cached == prompt_of(svc, question, doc).n_shared > len(doc) // 8, cached
        follow_ups.append((question, doc, prompt, ids, cached))
    return follow_ups


# (model, settings, prompt) -> the cold answer; (model, prompt, cold, cached answer) of the
# cases already checked. Services of one model file and settings give a prompt the same cold
# answer, and a check's verdict depends on nothing but its case: the Gemma tests below ask
# the same follow-up and need its cold answer (~700 prompt tokens) and check only once.
_COLD: dict[tuple, list[int]] = {}
_CHECKED: set[tuple] = set()


def check_near_cold(svc: LLMService, model: Path, follow_ups: list[tuple]) -> None:
    cases = []
    info = svc.get_model_info()["kv_cache"]
    settings = info["n_ctx"], info["n_parallel"], info["reuse"]
    for question, doc, prompt, ids, _ in follow_ups:
        key = (str(model), settings, tuple(prompt))
        if key not in _COLD:
            svc.clear_kv_cache()
            cold_prompt, cold_ids, cached = ask(svc, question, doc)
            assert cached == 0 and cold_prompt == prompt
            _COLD[key] = cold_ids
        case = (tuple(prompt), tuple(_COLD[key]), tuple(ids))
        if (str(model), *case) not in _CHECKED:
            cases.append(case)
    near_ties(model, cases, "answers through the cache")
    _CHECKED.update((str(model), *case) for case in cases)


@pytest.fixture(scope="module")
def gemma_one_slot(default_gguf: Path) -> Iterator[LLMService]:
    """One slot (each new document pushes the last one out to the RAM cache), KV_REUSE=fast;
    each test that uses it starts from an empty cache."""
    with LLMService(default_gguf, max_length=2048, n_parallel=1) as svc:
        yield svc


@pytest.fixture(scope="module")
def gemma_exact(default_gguf: Path) -> Iterator[LLMService]:
    """As ``gemma_one_slot``, with KV_REUSE=exact."""
    with LLMService(default_gguf, max_length=2048, n_parallel=1, kv_reuse="exact") as svc:
        yield svc


def test_gemma_a_document_comes_back_from_ram_past_the_window(gemma_one_slot: LLMService,
                                                              default_gguf: Path) -> None:
    # A, then a short question that pushes A out of the one slot to RAM, then A's follow-up:
    # restored from RAM past Gemma's window of 512. Several documents in turn, each back from
    # RAM beside the others' entries, are test_tiny_gpt_oss_documents_in_turn_...'s (three,
    # past its window; a Gemma one costs ~700 prompt tokens per question on one core)
    svc = gemma_one_slot
    svc.clear_kv_cache()
    info = svc.get_model_info()["kv_cache"]
    assert info["reuse"] == "fast" and info["n_swa"] == 512
    restored = info["ram_tokens_restored"]
    doc = document(0, GEMMA_REPEATS)
    prompt, _, _ = ask(svc, QUESTIONS[0][0], doc)
    assert len(prompt) > 512 + 128  # past the window: checkpoints or nothing
    svc.answer("Who are you?", **GREEDY)
    assert svc.get_model_info()["kv_cache"]["ram_entries"] == 1
    prompt, ids, cached = ask(svc, QUESTIONS[0][1], doc)
    assert cached >= len(prompt) - 4 * 64 and cached > 512, (cached, len(prompt))
    assert svc.get_model_info()["kv_cache"]["ram_tokens_restored"] - restored == cached
    check_near_cold(svc, default_gguf, [(QUESTIONS[0][1], doc, prompt, ids, cached)])


@pytest.mark.slow
def test_tiny_gpt_oss_documents_in_turn_reuse_past_the_window(tiny_gguf) -> None:
    model = tiny_gguf("q8_0")
    with LLMService(model, max_length=2048, n_parallel=1) as svc:  # flash attention: auto
        assert svc.get_model_info()["kv_cache"]["n_swa"] == 8
        follow_ups = documents_in_turn(svc, 12, 8, up_to_the_question=True)
        check_near_cold(svc, model, follow_ups)


@pytest.fixture(scope="module")
def tiny_and_gemma(tiny_gguf, default_gguf: Path):
    """A gpt-oss service and a Gemma one, loaded once for the questions below."""
    with LLMService(tiny_gguf("q8_0"), max_length=2048) as svc, \
            LLMService(default_gguf, max_length=2048) as gemma:
        yield svc, gemma


@pytest.mark.parametrize("other", ["Who goes there?", "12 times?", '"Where," she asked?',
                                   "<|end|> is it <|return|>?"])
def test_a_rag_prompt_knows_where_its_question_begins(tiny_and_gemma, other: str) -> None:
    """Prompt.n_shared: the tokens another question over the same context shares, where the
    KV cache keeps a window checkpoint (gpt-oss; other formats do not say)."""
    doc = document(0, 6)
    svc, gemma = tiny_and_gemma
    first, second = prompt_of(svc, "Where is it?", doc), prompt_of(svc, other, doc)
    n = first.n_shared
    assert n == second.n_shared > 0
    assert first.tokens[:n] == second.tokens[:n] and first.tokens[n] != second.tokens[n]
    assert svc._engine.detokenize(first.tokens[:n]).endswith(doc + "\n\nQuestion:")
    # no context: what every question shares is the system and developer messages
    plain = prompt_of(svc, other, None)
    assert plain.n_shared == prompt_of(svc, "Where is it?", None).n_shared
    assert svc._engine.detokenize(plain.tokens[plain.n_shared:]).startswith(other[:1])
    assert prompt_of(gemma, other, doc).n_shared == 0


def test_a_saved_cache_serves_another_service_past_the_window(
        gemma_one_slot: LLMService, gemma_exact: LLMService, default_gguf: Path,
        tmp_path: Path) -> None:
    doc = document(0, GEMMA_REPEATS)
    path = tmp_path / "doc.kvcache"
    svc = gemma_one_slot
    svc.clear_kv_cache()
    ask(svc, QUESTIONS[0][0], doc)
    assert svc.save_kv_cache(path) == 1
    # saving left the slot whole: the next question still reuses it
    prompt, _, cached = ask(svc, QUESTIONS[0][1], doc)
    assert cached >= len(prompt) - 4 * 64
    with LLMService(default_gguf, max_length=2048, n_parallel=1) as other:
        assert other.load_kv_cache(path) == 1
        prompt, ids, cached = ask(other, QUESTIONS[0][1], doc)
        assert cached >= len(prompt) - 4 * 64 and cached > 512
        check_near_cold(other, default_gguf, [(QUESTIONS[0][1], doc, prompt, ids, cached)])
    # a fast file is not for an exact engine (it holds cuts an exact one never makes)
    with pytest.raises(KVCacheMismatchError, match="kv_reuse"):
        gemma_exact.load_kv_cache(path)


def test_exact_reuses_nothing_restored_past_the_window_with_flash_attention(tiny_path) -> None:
    # KV_REUSE=exact with flash attention on: a prefix past the window does not restore
    # exactly (restore_is_exact), so the RAM cache must not keep it. On the tiny fixture
    # (window 8) a document of ~240 tokens is far past it; within Gemma's window of 512,
    # the same policy keeps a document (test_kvcache_service.py, ~160 tokens): a window read
    # from anywhere but the model would fail one of the two
    with LLMService(tiny_path, max_length=2048, n_parallel=1, kv_reuse="exact",
                    flash_attn=True) as svc:
        doc = document(1, 12)
        prompt, _, _ = ask(svc, QUESTIONS[1][0], doc)
        assert len(prompt) >= 3 * 64 and svc.get_model_info()["kv_cache"]["n_swa"] == 8
        svc.answer("Who are you?", **GREEDY)  # the document leaves the one slot ...
        _, _, cached = ask(svc, QUESTIONS[1][1], doc)
        # ... and is not restored: at most the page of the preamble that both questions
        # share, still in the slot (no restore there), is reused
        assert cached <= 64
        assert svc.get_model_info()["kv_cache"]["ram_entries"] == 0
