"""The KV cache on the real llama.cpp engine: is saved state exact, what each cache mode
costs, the RAM prefix cache, and saved files (good, mismatched, truncated, garbage).

Contexts here are bare llama.cpp contexts (tests/kv_context.py). Logits are compared
bit for bit only against a cold cache fed the same batches. Where the restored cells land
where the cold ones lie, deterministic kernels make that hold on every CPU; past a sliding
window (flash attention off) the window cells move, and exactness there is the claim of
``restore_is_exact``, which the RAM cache relies on and these tests check. How far logits
move where the policy refuses a restore is the kernels' business, measured in
``benchmarks/kv_layout.py``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import llama_cpp.llama_cpp as lib
import numpy as np
import pytest

from ggufllm import KVCacheError, KVCacheMismatchError
from ggufllm.engine.kvcache import PrefixCache, restore_is_exact, seq_state_get, seq_state_set
from ggufllm.engine.kvfile import KVCacheIdentity, load_prefixes, save_prefixes
from ggufllm.engine.kvstore import CHECKPOINT_TAIL, KVStore, checkpoint_positions
from ggufllm.engine.native import NativeModel
from ggufllm.engine.slots import Slot as EngineSlot
from ggufllm.gguf_file import read_gguf_header
from ggufllm.kvlayout import KVLayout, kv_cache_bytes

from .gpt_oss_fixture import TINY_CONFIG, small_vocab_config, write_checkpoint
from .kv_context import KVSizeLog, RawContext, random_prompt

MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    model = NativeModel(str(tiny_gguf("q8_0")))
    yield model
    model.close()


@pytest.fixture(scope="module")
def gemma(default_gguf):
    model = NativeModel(str(default_gguf))
    yield model
    model.close()


def _models(request, name: str) -> NativeModel:
    return request.getfixturevalue(name)


def round_trip(ctx: RawContext, prompt: list[int], *, busy: list[int] | None = None,
               seq: int = 0, steps: int = 4) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Greedy logits after ``prompt`` without and with a save -> clear -> restore of the
    sequence before its last token (both decode the same batches; ``busy`` fills
    sequence 1 first, in both runs, so that the cell layouts can match). The state is
    saved from the cold run's own cache before its last token (reading a sequence's state
    leaves the cache as it was), so the prompt is evaluated once."""
    n = len(prompt)
    ctx.clear()
    if busy:
        ctx.decode(busy, 0, 1)
    ctx.decode(prompt[:-1], 0, seq)
    state = seq_state_get(ctx.ptr, seq)
    cold = ctx.greedy(ctx.decode(prompt[-1:], n - 1, seq), n, seq, steps)
    ctx.clear()
    if busy:
        ctx.decode(busy, 0, 1)
    assert seq_state_set(ctx.ptr, seq, state, n - 1)
    warm = ctx.greedy(ctx.decode(prompt[-1:], n - 1, seq), n, seq, steps)
    return cold, warm


def identical(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# -- does a restore give the same logits? ---------------------------------------------

# (model, prompt tokens, flash_attn, other sequence busy): cases the policy allows
EXACT_CASES = [
    ("tiny", 260, False, False),   # past the window of 8, window across a 256-cell chunk
    ("tiny", 1000, False, True),   # two prompt batches, another sequence in the cache
    ("tiny", 8, None, False),      # nothing masked yet
    ("gemma", 260, None, False),   # under Gemma's window of 512 (past 256 cells), flash on
    ("gemma", 600, False, False),  # past the window, flash attention off
]


@pytest.mark.slow  # 2 threads: minutes on a loaded 2-core box
@pytest.mark.parametrize("name,n,flash_attn,busy", EXACT_CASES)
def test_restore_is_bit_identical_where_the_policy_allows_it(request, all_cores, name, n,
                                                            flash_attn, busy):
    """What the RAM cache promises (``restore_is_exact``): a prefix it keeps restores to the
    logits of the cache it was saved from. Within the window the restored cells land where
    they were, so that follows from deterministic kernels. Past the window (flash attention
    off) the saved state leaves out the masked window cells and the rest land at other
    indices; the non-flash attention kernels have added them the same way on every CPU
    tried (AVX2, AVX-512; 2 threads, since the flash-attention kernel splits by thread).
    Should a CPU break that, this fails there, and restore_is_exact must refuse the case."""
    model = _models(request, name)
    n_swa = KVLayout.from_gguf(read_gguf_header(model.path)).n_swa
    assert restore_is_exact(n - 1, n_swa=n_swa, flash_attn=flash_attn)
    with RawContext(model, n_ctx=2048, n_seq=2, flash_attn=flash_attn, n_threads=2) as ctx:
        cold, warm = round_trip(ctx, random_prompt(n), busy=random_prompt(300, 1) if busy
                                else None)
    assert identical(cold, warm)


@pytest.mark.parametrize("flash_attn", [True, None])
def test_a_prefix_past_the_window_with_flash_attention_is_never_kept(tiny, flash_attn):
    """Restoring it would put its window cells at other indices, where the flash-attention
    kernel adds them in another grouping (``benchmarks/kv_layout.py`` measures the change):
    the store refuses to keep it, so no answer goes through such a restore. A prefix that
    has not passed the window yet is kept."""
    n_swa = KVLayout.from_gguf(read_gguf_header(tiny.path)).n_swa
    with RawContext(tiny, n_ctx=512, flash_attn=flash_attn) as ctx:
        store = KVStore(ctx.ptr, PrefixCache(MiB, n_swa=n_swa, flash_attn=flash_attn),
                        identity_of(tiny, flash_attn=flash_attn is not False))
        for n, kept in [(n_swa, True), (4 * n_swa, False)]:
            ctx.clear()
            prompt = random_prompt(n, 40)
            ctx.decode(prompt, 0)
            assert store.keep(Slot(0, prompt)) is kept
    assert store.stats()["ram_entries"] == 1


def test_failed_restore_leaves_the_sequence_empty(tiny):
    with RawContext(tiny, n_ctx=512, n_seq=2) as ctx:
        prompt = random_prompt(40)
        ctx.decode(prompt, 0, 0)
        state = seq_state_get(ctx.ptr, 0)
        ctx.decode(random_prompt(30, 2), 0, 1)
        for bad, n_tokens in [(state[:len(state) // 2], 40), (state[:8], 40),
                              (bytes(len(state)), 40), (state, 39)]:
            assert not seq_state_set(ctx.ptr, 1, bad, n_tokens)
            assert ctx.pos_range(1) == (-1, -1)
        assert ctx.pos_range(0) == (0, 39)  # the other sequence is untouched
        assert seq_state_set(ctx.ptr, 1, state, 40) and ctx.pos_range(1) == (32, 39)


# -- the RAM cache -------------------------------------------------------------------


def test_ram_cache_restores_the_best_prefix_into_another_slot(gemma):
    """Two documents asked about in turn, each prefix kept in RAM: the one a new prompt
    shares is restored into slot 1 and cut back to what the prompt shares; the logits
    equal a cold cache fed the same batches into the same cells (under Gemma's window:
    nothing is masked; a document of 260 tokens, past 256 cells; the other one only
    competes in the lookup, and is short)."""
    doc_a, doc_b = random_prompt(260, 3), random_prompt(60, 4)
    q1, q2 = random_prompt(20, 5), random_prompt(25, 6)
    cache = PrefixCache(64 * MiB, n_swa=512, flash_attn=None)
    with RawContext(gemma, n_ctx=2048, n_seq=2) as ctx:
        # cold: doc_a + q1 in one batch in slot 0, kept; then handed to slot 1 (a copy of
        # the cells' sequence ids: the cells, and so the logits, are where they were, as if
        # it had been evaluated there), cut back to doc_a, and q2 after it
        ctx.decode(doc_a + q1, 0, 0)
        assert cache.put(doc_a + q1, seq_state_get(ctx.ptr, 0))
        lib.llama_memory_seq_cp(ctx.mem, 0, 1, -1, -1)
        assert lib.llama_memory_seq_rm(ctx.mem, 0, -1, -1)
        assert ctx.pos_range(0) == (-1, -1) and ctx.pos_range(1) == (0, 279)
        assert lib.llama_memory_seq_rm(ctx.mem, 1, 260, -1)
        cold = ctx.decode(q2, 260, 1)
        ctx.clear()
        ctx.decode(doc_b + q1, 0, 0)
        assert cache.put(doc_b + q1, seq_state_get(ctx.ptr, 0))
        prompt = doc_a + q2
        ctx.clear()
        entry, n_keep = cache.lookup(prompt)
        assert n_keep == 260 and np.array_equal(entry.tokens[:260], doc_a)
        assert seq_state_set(ctx.ptr, 1, entry.state, len(entry.tokens))
        assert lib.llama_memory_seq_rm(ctx.mem, 1, n_keep, -1)
        warm = ctx.decode(prompt[n_keep:], n_keep, 1)
    assert np.array_equal(warm, cold)
    stats = cache.stats()
    assert (stats.entries, stats.hits, stats.misses) == (2, 1, 0)


def test_ram_cache_is_a_bounded_lru():
    state = b"\xd8\x3c\x14\xaf" + bytes(996)
    cache = PrefixCache(3 * (1000 + 4 * 10))
    for i in range(4):
        assert cache.put([i] * 10, state)
    stats = cache.stats()
    assert (stats.entries, stats.evictions, stats.bytes) == (3, 1, 3 * 1040)
    assert cache.lookup([0] * 10) is None  # evicted, the oldest
    assert cache.lookup([1] * 10 + [7])[1] == 10
    cache.put([9] * 10, state)  # evicts [2]*10: [1]*10 was used more recently
    assert cache.lookup([2] * 5) is None and cache.lookup([1] * 5)[1] == 4
    assert not cache.put(list(range(10)), bytes(5000))  # bigger than the budget
    s = cache.stats()
    assert (s.hits, s.misses, s.refused) == (2, 2, 1)


def test_ram_cache_policy_for_sliding_windows():
    state = bytes(100)
    cache = PrefixCache(1 << 20, n_swa=8, flash_attn=None)
    assert not cache.put(list(range(20)), state)  # past the window with flash attention
    assert cache.put(list(range(6)), state)
    assert cache.lookup([0, 1, 2, 9])[1] == 3  # within the window: cut back freely
    off = PrefixCache(1 << 20, n_swa=8, flash_attn=False)
    assert off.put(list(range(20)), state)
    assert off.lookup(list(range(20)) + [5])[1] == 20
    # past the window an entry is only of use whole (the window cells before are gone),
    # and the last prompt token is always evaluated again
    assert off.lookup(list(range(20))) is None
    assert off.lookup(list(range(15)) + [0]) is None


def test_window_checkpoints_at_the_tail_pages_the_prompt_end_and_the_question():
    # a 1,000-token prompt, 12 tokens of answer after it: the pages of its last 256 tokens
    # and its end; with the question's start known (n_shared), there too
    assert checkpoint_positions(1000, 1012) == [1000, 960, 896, 832, 768]
    assert checkpoint_positions(1000, 1012, 987) == [1000, 987, 960, 896, 832, 768]
    # far before the tail (a long question): still kept
    assert 500 in checkpoint_positions(1000, 1012, 500)
    assert min(checkpoint_positions(1000, 1012)) >= 1000 - CHECKPOINT_TAIL
    assert checkpoint_positions(1000, 1000, 1000) == [960, 896, 832, 768]  # below n_tokens


# -- memory of each cache mode -------------------------------------------------------


# (type, swa_full, sequences, unified)
MODES = [("f16", True, 1, True), ("f16", False, 4, True), ("f16", False, 4, False),
         ("q8_0", True, 4, True), ("q4_0", False, 4, True), ("q8_0", False, 1, True)]


@pytest.mark.parametrize("name", ["tiny", "gemma"])
def test_kv_bytes_match_what_llama_cpp_allocates(request, name):
    model = _models(request, name)
    layout = KVLayout.from_gguf(read_gguf_header(model.path))
    modes = [m for m in MODES if layout.kv_type_problem(m[0]) is None]
    assert len(modes) == (3 if name == "tiny" else 6)  # tiny heads of 16: f16 only
    log = logging.getLogger("ggufllm.llama_cpp")
    handler, level = KVSizeLog(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        for kv_type, swa_full, n_seq, unified in modes:
            handler.sizes.clear()
            with RawContext(model, n_ctx=2000, n_seq=n_seq, unified=unified, swa_full=swa_full,
                            kv_type=kv_type, flash_attn=True):
                pass
            want = kv_cache_bytes(layout, n_ctx=2000, n_seq=n_seq, kv_type=kv_type,
                                  swa_full=swa_full, unified=unified)
            (full_mib, full_cells, _), (swa_mib, swa_cells, _) = handler.sizes
            assert (full_cells, swa_cells) == (want.full_cells, want.swa_cells)
            assert abs(full_mib - want.full_bytes / MiB) < 0.006
            assert abs(swa_mib - want.swa_bytes / MiB) < 0.006
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "q4_0"])
def test_bytes_per_token_match_the_saved_state(gemma, kv_type):
    """One more token in a saved sequence costs K+V of every layer plus 12 bytes of cell
    metadata in each of the two caches (full and window): the arithmetic, to the byte."""
    layout = KVLayout.from_gguf(read_gguf_header(gemma.path))
    with RawContext(gemma, n_ctx=512, kv_type=kv_type, flash_attn=True) as ctx:
        ctx.decode(random_prompt(3), 0)
        three = len(seq_state_get(ctx.ptr, 0))
        ctx.decode(random_prompt(1, 9), 3)
        four = len(seq_state_get(ctx.ptr, 0))
    per_token = (layout.bytes_per_token(kv_type, window=False)
                 + layout.bytes_per_token(kv_type, window=True))
    assert four - three == per_token + 2 * 12


def test_quantized_cache_needs_whole_blocks_per_head(tiny):
    layout = KVLayout.from_gguf(read_gguf_header(tiny.path))
    assert "multiple of 32" in layout.kv_type_problem("q8_0")
    with pytest.raises(AssertionError, match="refused"):
        RawContext(tiny, n_ctx=512, kv_type="q8_0", flash_attn=True)
    assert KVLayout.gpt_oss_20b().kv_type_problem("q4_0") is None


def test_gpt_oss_20b_kv_arithmetic():
    layout = KVLayout.gpt_oss_20b()
    assert layout.bytes_per_token("f16", window=False) == 24 * 1024
    four_slots = dict(n_ctx=4 * 4096, n_seq=4)
    full = kv_cache_bytes(layout, **four_slots, swa_full=True)
    small = kv_cache_bytes(layout, **four_slots, swa_full=False)
    assert full.total == 768 * MiB  # 384 MiB full-attention + 384 MiB full-size window
    assert small.total == 384 * MiB + 24 * MiB  # window: pad256(128 x 4 + 512) cells
    q8 = kv_cache_bytes(layout, **four_slots, kv_type="q8_0", swa_full=False)
    assert q8.total == (384 + 24) * MiB * 34 // 64


@pytest.mark.slow
def test_gpt_oss_20b_attention_shape_matches_llama_cpp(tmp_path, small_vocab_tokenizer):
    """A checkpoint with gpt-oss-20b's attention (24 layers, 8 KV heads x 64, window 128,
    even layers sliding) and tiny everything else: llama.cpp allocates what the
    arithmetic for gpt-oss-20b says. (The vocabulary's size changes no KV cell: the
    small-vocabulary tokenizer spares converting and loading 201k tokens.)"""
    from convert import convert

    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg |= {"num_hidden_layers": 24, "num_key_value_heads": 8, "head_dim": 64,
            "num_attention_heads": 8, "sliding_window": 128,
            "layer_types": ["sliding_attention", "full_attention"] * 12}
    ckpt = write_checkpoint(tmp_path / "ck", small_vocab_tokenizer,
                            config=small_vocab_config(cfg))
    path = convert(ckpt, tmp_path / "m.gguf", "q8_0", "mxfp4").path
    layout = KVLayout.from_gguf(read_gguf_header(path))
    assert layout == KVLayout.gpt_oss_20b()
    model = NativeModel(str(path))
    log = logging.getLogger("ggufllm.llama_cpp")
    handler, level = KVSizeLog(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        with RawContext(model, n_ctx=8192, n_seq=4, swa_full=False, flash_attn=True):
            pass
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        model.close()
    want = kv_cache_bytes(layout, n_ctx=8192, n_seq=4, swa_full=False)
    (full_mib, full_cells, _), (swa_mib, swa_cells, _) = handler.sizes
    assert (full_cells, swa_cells) == (want.full_cells, want.swa_cells) == (8192, 1024)
    assert (full_mib, swa_mib) == (want.full_bytes / MiB, want.swa_bytes / MiB) == (192, 24)


# -- saved files -----------------------------------------------------------------------


def identity_of(model: NativeModel, **changes) -> KVCacheIdentity:
    context = dict(n_ctx=512, n_seq=1, kv_unified=True, kv_type="f16", swa_full=True,
                   flash_attn=False) | changes
    return KVCacheIdentity.of(read_gguf_header(model.path), **context)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """A file with two prefixes of the tiny model, and the logits to expect after each."""
    path = tmp_path_factory.mktemp("kv") / "cache.kv"
    cache = PrefixCache(16 * MiB, n_swa=8, flash_attn=False)
    expected = []
    with RawContext(tiny, n_ctx=512, flash_attn=False) as ctx:
        for seed in (10, 11):
            prompt = random_prompt(100, seed)
            ctx.clear()
            ctx.decode(prompt[:-1], 0)
            cache.put(prompt[:-1], seq_state_get(ctx.ptr, 0))
            expected.append((prompt, ctx.decode(prompt[-1:], 99)))
    save_prefixes(path, cache.entries(), identity_of(tiny))
    return path, expected


def test_saved_prefixes_restore_in_a_new_process(saved, tiny):
    path, expected = saved
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from ggufllm.engine.kvcache import seq_state_set
        from ggufllm.engine.kvfile import load_prefixes
        from ggufllm.engine.native import NativeModel
        from tests.kv_context import RawContext
        from tests.test_kvcache import identity_of
        model = NativeModel({tiny.path!r})
        entries = load_prefixes({str(path)!r}, identity_of(model))
        with RawContext(model, n_ctx=512, flash_attn=False) as ctx:
            for e in entries:
                ctx.clear()
                assert seq_state_set(ctx.ptr, 0, e.state, len(e.tokens))
                last = int(input())
                np.save(sys.stdout.buffer, ctx.decode([last], len(e.tokens)))
        model.close()
    """)
    stdin = "".join(f"{prompt[-1]}\n" for prompt, _ in expected)
    out = subprocess.run([sys.executable, "-c", script], input=stdin.encode(), check=True,
                         capture_output=True, cwd=Path(__file__).parent.parent).stdout
    import io
    buf = io.BytesIO(out)
    for _, logits in expected:
        assert np.array_equal(np.load(buf), logits)


@pytest.mark.parametrize("change", [dict(n_ctx=1024), dict(kv_type="q8_0"),
                                    dict(swa_full=False), dict(flash_attn=True),
                                    dict(n_seq=4)])
def test_a_file_for_another_setting_is_refused(saved, tiny, change):
    with pytest.raises(KVCacheMismatchError, match=next(iter(change))):
        load_prefixes(saved[0], identity_of(tiny, **change))


def test_a_file_for_another_model_is_refused(saved, gemma):
    with pytest.raises(KVCacheMismatchError, match="model_digest"):
        load_prefixes(saved[0], identity_of(gemma))


def test_truncated_and_garbage_files_are_refused(saved, tiny, tmp_path):
    good = saved[0].read_bytes()
    identity = identity_of(tiny)
    bad = tmp_path / "bad.kv"
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40
    cases = {"truncated": [good[:n] for n in (5, 20, 40, 300, len(good) // 2, len(good) - 1)],
             "not a ggufllm": [b"garbage" * 100, bytes(64)],
             "checksum": [bytes(flipped)],
             "longer than": [good + b"\0"],
             "empty": [b""]}
    for reason, contents in cases.items():
        for data in contents:
            bad.write_bytes(data)
            with pytest.raises(KVCacheError, match=reason) as info:
                load_prefixes(bad, identity)
            assert not isinstance(info.value, KVCacheMismatchError)
    with pytest.raises(KVCacheError, match="cannot read"):
        load_prefixes(tmp_path / "missing.kv", identity)
    assert len(load_prefixes(saved[0], identity)) == 2  # the good file still loads


def test_a_failed_save_keeps_the_old_file(saved, tiny, tmp_path, monkeypatch):
    target = tmp_path / "c.kv"
    target.write_bytes(saved[0].read_bytes())
    before = target.read_bytes()

    def full_disk(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ggufllm.engine.kvfile.os.fsync", full_disk)
    with pytest.raises(OSError):
        save_prefixes(target, [], identity_of(tiny))
    assert target.read_bytes() == before
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


# -- the store the scheduler plugs in -------------------------------------------------


def Slot(seq: int, tokens: list[int], n_exact: int = -1) -> EngineSlot:  # noqa: N802
    """The scheduler's slot, its whole content exact unless told otherwise."""
    return EngineSlot(seq, tokens, len(tokens) if n_exact < 0 else n_exact)


def test_store_saves_an_evicted_slot_and_restores_it_into_another(tiny, tmp_path):
    """The scheduler's way: prompts evaluated in 64-token pages, only whole pages exact.
    An evicted slot leaves its exact prefix (2 pages, past the tiny window, flash
    attention off) in RAM; a prompt sharing it gets it restored into another slot, and the
    logits equal a cold cache fed the same pages. The file written then does the same."""
    history, turn = random_prompt(150, 20), random_prompt(15, 21)
    prompt = history[:128] + turn
    with RawContext(tiny, n_ctx=1024, n_seq=2, flash_attn=False) as ctx:
        identity = identity_of(tiny, n_ctx=1024, n_seq=2)

        def store() -> KVStore:
            return KVStore(ctx.ptr, PrefixCache(8 * MiB, n_swa=8, flash_attn=False, page=64),
                           identity)

        def paged(tokens: list[int], seq: int) -> None:
            for start in range(0, len(tokens), 64):
                ctx.decode(tokens[start:start + 64], start, seq)

        def cold(tokens: list[int]) -> np.ndarray:
            ctx.clear()
            paged(tokens[:128], 1)
            return ctx.decode(tokens[128:], 128, 1)

        first = store()
        paged(history, 0)
        evicted = Slot(0, list(history), n_exact=128)  # the last partial page is not exact
        first.on_evict(evicted, 0)
        assert evicted.tokens == history[:128] and ctx.pos_range(0)[1] == 127
        ctx.decode(random_prompt(50, 22), 0, 1)  # slot 1 held something else
        ctx.clear()
        slot = Slot(1, [])
        assert first.on_place(slot, prompt, 0) == 128
        assert (slot.tokens, slot.n_exact) == (history[:128], 128)
        assert np.array_equal(ctx.decode(turn, 128, 1), cold(prompt))
        assert first.keep_slots([Slot(1, list(prompt), n_exact=128)]) == 1
        assert first.save(tmp_path / "s.kv") == 1
        assert first.stats()["ram_tokens_restored"] == 128

        second = store()  # as in a new process
        assert second.load(tmp_path / "s.kv") == 1
        ctx.clear()
        slot = Slot(1, [])
        assert second.on_place(slot, prompt + [5], 0) == 128
        assert np.array_equal(ctx.decode(turn + [5], 128, 1), cold(prompt + [5]))


def test_store_falls_back_to_evaluating_when_a_restore_fails(tiny):
    with RawContext(tiny, n_ctx=512, n_seq=2, flash_attn=False) as ctx:
        store = KVStore(ctx.ptr, PrefixCache(MiB, n_swa=8, flash_attn=False), identity_of(tiny))
        prompt = random_prompt(30, 30)
        ctx.decode(prompt, 0, 0)
        state = seq_state_get(ctx.ptr, 0)
        store.cache.put(prompt, state[: len(state) // 2])  # a state that cannot load
        slot = Slot(1, [1, 2, 3])
        assert store.on_place(slot, prompt + [7], 0) == 0
        assert (slot.tokens, slot.n_exact) == ([], 0) and ctx.pos_range(1) == (-1, -1)
        assert ctx.pos_range(0) == (0, 29)
    assert store.stats()["ram_restore_failures"] == 1
