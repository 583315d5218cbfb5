"""The KV cache through LLMService with KV_REUSE=exact: RAM-cache restores, warm(), saved
files in a new process, and files that must be refused. Greedy answers through the cache
must equal the cold answers token for token (tests/test_kv_reuse.py holds the default,
fast).

Gemma 3 270M, the default model, holds that promise for a prefix restored from RAM and for
one saved by another process, and the refusal of a file saved under other settings (a
quantized cache is Gemma's alone). The tiny gpt-oss fixture (random weights, a window of 8
tokens; a prompt costs next to nothing) holds the rest: a restore past its window, warm(),
one-token answers, files of another model or damaged. Its answers are arbitrary tokens, so
only equalities, counts and errors are asserted on them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufllm import KVCacheError, KVCacheMismatchError, LLMService

GREEDY = dict(temperature=0.0, max_tokens=12)
FACT_A = "The Zorblat festival is held every spring in the town of Quenby."
FACT_B = "Mount Ferrow is the tallest peak of the Ulm range, at 4,210 metres."
# Gemma: a document of ~100 tokens (prompts of ~170, whose ~160 shared tokens make two whole
# 64-token pages), inside Gemma's 512-token window, so that its prefixes are kept in RAM with
# flash attention on (see restore_is_exact); DOC_B only pushes DOC_A out of the one slot
DOC_A, DOC_B = " ".join([FACT_A] * 6), " ".join([FACT_B] * 2)
# the tiny model: ten repeats (~150 tokens, far past its window of 8)
TINY_A, TINY_B = " ".join([FACT_A] * 10), " ".join([FACT_B] * 10)


def tokens(svc: LLMService, question: str, context: str) -> tuple[tuple[int, ...], int]:
    answer = svc.answer(question, context, **GREEDY)
    return tuple(answer.token_ids), answer.timings.n_cached


def cold(svc: LLMService, question: str, context: str) -> tuple[int, ...]:
    svc.clear_kv_cache()
    ids, n_cached = tokens(svc, question, context)
    assert n_cached == 0
    return ids


# one_slot's cold answers, each computed once: from an empty cache the same prompt is
# evaluated in the same batches into the same cells, so its answer is the same every time
_GEMMA_COLD: dict[tuple[str, str], tuple[int, ...]] = {}


def gemma_cold(one_slot: LLMService, question: str, context: str) -> tuple[int, ...]:
    if (question, context) not in _GEMMA_COLD:
        _GEMMA_COLD[question, context] = cold(one_slot, question, context)
    return _GEMMA_COLD[question, context]


@pytest.fixture(scope="module")
def one_slot(default_gguf):
    """One slot, so that a second document pushes the first one out to RAM."""
    with LLMService(default_gguf, max_length=1024, n_parallel=1, kv_reuse="exact") as svc:
        yield svc


@pytest.fixture(scope="module")
def tiny_one_slot(tiny_gguf) -> Iterator[LLMService]:
    """The tiny gpt-oss fixture in one slot, flash attention off: its prefixes past the
    window are kept in RAM then (the measured exact case)."""
    with LLMService(tiny_gguf("q8_0"), max_length=1024, n_parallel=1, kv_reuse="exact",
                    flash_attn=False) as svc:
        yield svc


def test_a_prefix_restored_from_ram_gives_the_cold_answer(one_slot):
    svc = one_slot
    svc.clear_kv_cache()
    tokens(svc, "Where is the Zorblat festival held?", DOC_A)
    tokens(svc, "How tall is Mount Ferrow?", DOC_B)  # slot reused: DOC_A's prefix to RAM
    info = svc.get_model_info()["kv_cache"]
    assert info["ram_entries"] >= 1 and info["ram_bytes"] > 0
    warm, n_cached = tokens(svc, "When is the Zorblat festival?", DOC_A)
    restored = svc.get_model_info()["kv_cache"]["ram_tokens_restored"]
    assert n_cached >= 128 and restored >= 128 and n_cached % 64 == 0
    assert warm == gemma_cold(svc, "When is the Zorblat festival?", DOC_A)
    svc.clear_kv_cache()
    assert svc.get_model_info()["kv_cache"]["ram_entries"] == 0  # clear_kv_cache empties RAM


def test_warm_keeps_the_shared_prefix_of_questions_over_a_context(tiny_one_slot):
    svc = tiny_one_slot
    svc.clear_kv_cache()
    n = svc.warm(TINY_B)
    assert n > 128
    warm, n_cached = tokens(svc, "What range is Mount Ferrow in?", TINY_B)
    assert n_cached >= 128 and n - n_cached < 64  # the whole pages of the warmed prefix
    assert warm == cold(svc, "What range is Mount Ferrow in?", TINY_B)


def test_an_answer_of_one_token_leaves_the_engine_working(tiny_one_slot):
    for _ in range(2):
        assert tiny_one_slot.answer("Where is Quenby?", TINY_A, temperature=0.0,
                                    max_tokens=1).timings.n_generated == 1


def test_tiny_gpt_oss_ram_restore_past_its_window_without_flash_attention(tiny_one_slot):
    """The sliding-window model: prefixes longer than the window are kept when flash
    attention is off (the measured exact case), and the restored answer is the cold one."""
    svc = tiny_one_slot
    svc.clear_kv_cache()
    restored = svc.get_model_info()["kv_cache"]["ram_tokens_restored"]
    tokens(svc, "Where is the Zorblat festival held?", TINY_A)
    tokens(svc, "How tall is Mount Ferrow?", TINY_B)
    warm, n_cached = tokens(svc, "When is the Zorblat festival?", TINY_A)
    info = svc.get_model_info()["kv_cache"]
    assert info["n_swa"] == 8 and info["ram_tokens_restored"] - restored >= 128
    assert n_cached >= 128
    assert warm == cold(svc, "When is the Zorblat festival?", TINY_A)


_CHILD = """
import json, sys
from ggufllm import LLMService
path, model, question, context = sys.argv[1:5]
with LLMService(model, max_length=1024, n_parallel=1, kv_reuse="exact") as svc:
    kept = svc.load_kv_cache(path)
    answer = svc.answer(question, context, temperature=0.0, max_tokens=12)
    print(json.dumps({"kept": kept, "ids": list(answer.token_ids),
                      "n_cached": answer.timings.n_cached}))
"""


@pytest.fixture(scope="module")
def saved(one_slot, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kv") / "doc_a.kvcache"
    one_slot.clear_kv_cache()
    tokens(one_slot, "Where is the Zorblat festival held?", DOC_A)
    assert one_slot.save_kv_cache(path) == 1
    return path


def test_a_saved_cache_gives_the_cold_answer_in_a_new_process(one_slot, saved, default_gguf):
    question = "When is the Zorblat festival?"  # the RAM test's: its cold answer is known
    out = subprocess.run([sys.executable, "-c", _CHILD, str(saved), str(default_gguf),
                          question, DOC_A], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["kept"] == 1 and child["n_cached"] >= 128
    assert tuple(child["ids"]) == gemma_cold(one_slot, question, DOC_A)


@pytest.mark.parametrize("settings,fields", [
    # another window and a quantized cache at once: each is named (n_ctx is the pool's
    # size, which only max_length changes here)
    (dict(max_length=2048, kv_cache_type="q8_0"), ("n_ctx", "kv_type")),
    (dict(n_parallel=2), ("n_seq",)),
])
def test_a_cache_saved_under_other_settings_is_refused(saved, default_gguf, settings, fields):
    with LLMService(default_gguf, **{"max_length": 1024, "n_parallel": 1, "kv_reuse": "exact",
                                     **settings}) as svc:
        with pytest.raises(KVCacheMismatchError) as info:
            svc.load_kv_cache(saved)
        for field in fields:
            assert field in str(info.value), (field, str(info.value))
        assert svc.get_model_info()["kv_cache"]["ram_entries"] == 0
        # the service still answers (a short prompt: its one slot serves any prompt)
        assert svc.answer("Where is Quenby?", max_tokens=4, temperature=0.0).token_ids


def test_a_cache_of_another_model_is_refused(saved, tiny_one_slot):
    with pytest.raises(KVCacheMismatchError, match="model"):
        tiny_one_slot.load_kv_cache(saved)
    assert tiny_one_slot.answer("Where is Quenby?", TINY_A, **GREEDY).timings.n_generated > 0


def test_truncated_and_garbage_caches_are_refused_and_the_service_answers(tiny_one_slot,
                                                                         tmp_path):
    svc = tiny_one_slot
    svc.clear_kv_cache()
    tokens(svc, "Where is the Zorblat festival held?", TINY_A)
    good = tmp_path / "good.kvcache"
    assert svc.save_kv_cache(good) == 1
    data = good.read_bytes()
    bad = tmp_path / "bad.kvcache"
    for content in (data[:len(data) // 3], data[:-1], b"\x00" * 4096, b"not a cache file"):
        bad.write_bytes(content)
        with pytest.raises(KVCacheError) as info:
            svc.load_kv_cache(bad)
        assert not isinstance(info.value, KVCacheMismatchError)
        assert svc.answer("Where is Quenby?", TINY_A, **GREEDY).timings.n_generated > 0
    with pytest.raises(KVCacheError):
        svc.load_kv_cache(tmp_path / "missing.kvcache")
    assert svc.load_kv_cache(good) == 1  # the good file still loads
