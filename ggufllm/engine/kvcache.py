"""The KV cache beyond one context: one sequence's state as bytes, and a host-RAM cache of
prompt prefixes (what the cache costs is :mod:`ggufllm.kvlayout`'s arithmetic).

- :func:`seq_state_get` / :func:`seq_state_set`: one sequence's KV cells as bytes
  (``llama_state_seq_get_data`` / ``set_data``).
- :func:`restore_is_exact`: when restoring saved state gives the same logits as the
  evaluation it replaces (measured; see the function).
- :class:`PrefixCache`: a bounded LRU of prefixes (tokens -> state) in host RAM, looked
  up by longest common prefix, like llama-server's ``--cache-ram``.

Saving and loading these prefixes to a file lives in :mod:`ggufllm.engine.kvfile`.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as lib
import numpy as np

__all__ = [
    "seq_state_size", "seq_state_get", "seq_state_set",
    "restore_is_exact", "usable_prefix", "CachedPrefix", "PrefixCache", "PrefixCacheStats",
]

# -- one sequence's state ------------------------------------------------------------


# ``window``: only the sliding-window cells (a checkpoint, see CachedPrefix)
_WINDOW = lib.LLAMA_STATE_SEQ_FLAGS_SWA_ONLY


def seq_state_size(ctx: lib.llama_context_p, seq_id: int, *, window: bool = False) -> int:
    """Bytes :func:`seq_state_get` would copy (llama.cpp measures without copying)."""
    return int(lib.llama_state_seq_get_size_ext(ctx, seq_id, _WINDOW if window else 0))


def seq_state_get(ctx: lib.llama_context_p, seq_id: int, size: int | None = None, *,
                  window: bool = False) -> bytearray:
    """Copies the KV cells of sequence ``seq_id`` out of the context, once: the buffer
    llama.cpp writes is the one returned.

    Args:
        size: :func:`seq_state_size`, when the caller has it already.
        window: only the sliding-window cells.

    Raises:
        RuntimeError: llama.cpp could not write the state (it logs why).
    """
    if size is None:
        size = seq_state_size(ctx, seq_id, window=window)
    buf = bytearray(size)
    dst = (ctypes.c_uint8 * size).from_buffer(buf)
    written = lib.llama_state_seq_get_data_ext(ctx, dst, size, seq_id, _WINDOW if window else 0)
    del dst  # release the export of ``buf`` before handing it on
    if size == 0 or written != size:
        raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
    return buf


def seq_state_set(ctx: lib.llama_context_p, seq_id: int, state: bytes | bytearray,
                  n_tokens: int, *, window: bool = False) -> bool:
    """Puts saved state into sequence ``seq_id`` (replacing what it held; with ``window``,
    only its sliding-window cells, from a checkpoint).

    The restored sequence must end at position ``n_tokens - 1``; anything else (a state
    from other tokens) is removed again. On failure the sequence is left empty.

    Returns:
        True if the sequence now holds exactly those ``n_tokens`` positions.
    """
    mem = lib.llama_get_memory(ctx)
    # pointers into the caller's buffer, not copies of it
    src: Any
    if isinstance(state, bytearray):
        src = (ctypes.c_uint8 * len(state)).from_buffer(state)
    else:
        src = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
    # returns 0 on failure (a short or inconsistent buffer: llama.cpp logs why)
    read = lib.llama_state_seq_set_data_ext(ctx, src, len(state), seq_id,
                                            _WINDOW if window else 0)
    del src
    if read == len(state) and lib.llama_memory_seq_pos_max(mem, seq_id) == n_tokens - 1:
        return True
    lib.llama_memory_seq_rm(mem, seq_id, -1, -1)
    return False


def restore_is_exact(n_tokens: int, *, n_swa: int, flash_attn: bool | None) -> bool:
    """Whether restoring a saved sequence of ``n_tokens`` gives bit-identical logits to
    the cache it was saved from (measured: ``benchmarks/kv_layout.py``; held where the
    policy allows it by ``tests/test_kvcache.py``).

    A saved sequence leaves out the cells its sliding window masks, so past the window
    the restored window cells sit at other cell indices than before. Their values are
    the same, but llama.cpp's CPU flash-attention kernel splits the cells of a one-token
    decode into one chunk per thread (from 512 cells on) and adds each chunk apart: moved
    cells are summed in another grouping. Measured: logits off by up to ~1 on Gemma 3
    270M (greedy tokens change), and on the tiny gpt-oss fixture when its window
    straddles a chunk border. Without flash attention, or with no window, or with
    nothing masked yet (``n_tokens <= n_swa``), every measured restore was bit-identical.

    Args:
        n_tokens: tokens in the saved sequence.
        n_swa: the model's sliding window (0: none).
        flash_attn: the context's setting; None (llama.cpp decides, and on CPU it turns
            flash attention on) counts as on.
    """
    return n_swa == 0 or n_tokens <= n_swa or flash_attn is False


def usable_prefix(n_entry: int, n_common: int, n_swa: int,
                  checkpoints: Sequence[int] = ()) -> int:
    """How many tokens of a restored entry of ``n_entry`` tokens a prompt can keep when
    they share ``n_common`` tokens (0: restoring it does not help).

    A restored sliding-window sequence longer than the window holds only its last
    ``n_swa`` window cells, so it is of use whole, or cut back to one of its
    ``checkpoints``: positions at which the window cells were saved apart
    (:class:`CachedPrefix`). The window check before reuse (llama-server's, the
    scheduler's) wants ``pos_min <= n_keep - n_swa``.
    """
    if n_swa == 0 or n_entry <= n_swa or n_common >= n_entry:
        return n_common
    return max((p for p in checkpoints if p <= n_common), default=0)


# -- the RAM cache -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CachedPrefix:
    """A prompt prefix and its sequence state.

    Attributes:
        tokens: the prefix (int32).
        state: ``llama_state_seq_get_data`` of a sequence holding exactly ``tokens``
            (a bytearray when it was copied out of a context; never changed).
        checkpoints: ``(position, window state)`` pairs, positions ascending and below
            ``len(tokens)``: the sliding-window cells (``LLAMA_STATE_SEQ_FLAGS_SWA_ONLY``)
            of the sequence cut back to that position, so that the entry can be restored
            and cut back there (:func:`usable_prefix`); llama-server's "context
            checkpoints". Empty for models without a window and with ``KV_REUSE=exact``.
    """

    tokens: np.ndarray
    state: bytes | bytearray
    checkpoints: tuple[tuple[int, bytes | bytearray], ...] = ()

    @property
    def n_bytes(self) -> int:
        return len(self.state) + self.tokens.nbytes + sum(len(c) for _, c in self.checkpoints)

    @property
    def checkpoint_positions(self) -> tuple[int, ...]:
        return tuple(p for p, _ in self.checkpoints)


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters of a :class:`PrefixCache`."""

    entries: int
    bytes: int
    budget: int
    hits: int
    misses: int
    evictions: int
    refused: int  # puts not kept: restore not exact, or bigger than the budget


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(tokens, dtype=np.int32)


class PrefixCache:
    """A bounded LRU of prompt prefixes and their KV state, in host RAM.

    Thread-safe. With ``exact``, only entries whose restore is exact
    (:func:`restore_is_exact`) are kept, so that a hit never changes an answer;
    otherwise any prefix is (``KV_REUSE=fast``). An entry bigger than the whole budget
    is not kept; putting a prefix already held replaces it.

    Args:
        budget_bytes: most bytes of state and tokens held (``KV_CACHE_RAM_MB``; 0 keeps
            nothing).
        n_swa: the model's sliding window (0: none).
        flash_attn: the context's flash-attention setting (None: llama.cpp decides).
        page: a lookup keeps a multiple of this many tokens (the scheduler evaluates
            prompts in pages and reuses whole pages only, when exact).
        exact: keep only prefixes whose restore gives bit-identical logits.
    """

    def __init__(self, budget_bytes: int, *, n_swa: int = 0, flash_attn: bool | None = None,
                 page: int = 1, exact: bool = True) -> None:
        self.budget = budget_bytes
        self.n_swa = n_swa
        self.flash_attn = flash_attn
        self.page = page
        self.exact = exact
        self._entries: OrderedDict[bytes, CachedPrefix] = OrderedDict()  # oldest first
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._refused = 0
        self._lock = threading.Lock()

    def accepts(self, n_tokens: int) -> bool:
        """Whether a prefix of ``n_tokens`` would be kept (with ``exact``: its restore is
        exact)."""
        return n_tokens > 0 and (not self.exact or restore_is_exact(
            n_tokens, n_swa=self.n_swa, flash_attn=self.flash_attn))

    def fits(self, n_tokens: int, n_state: int) -> bool:
        """Whether a prefix of ``n_tokens`` with ``n_state`` bytes of state would be kept
        (asked before the state is copied out of the context)."""
        return self.accepts(n_tokens) and 4 * n_tokens + n_state <= self.budget

    def holds(self, tokens: Sequence[int] | np.ndarray) -> bool:
        """Whether an entry for exactly ``tokens`` is held."""
        with self._lock:
            return as_tokens(tokens).tobytes() in self._entries

    def put(self, tokens: Sequence[int] | np.ndarray, state: bytes | bytearray,
            checkpoints: tuple[tuple[int, bytes | bytearray], ...] = ()) -> bool:
        """Keeps ``state`` (and window ``checkpoints``, see :class:`CachedPrefix`) for
        ``tokens``, evicting the least recently used entries.

        Returns:
            False if nothing was kept: the restore would not be exact, or the entry
            alone exceeds the budget.
        """
        entry = CachedPrefix(as_tokens(tokens), state, checkpoints)
        if entry.n_bytes > self.budget or not self.accepts(len(entry.tokens)):
            with self._lock:
                self._refused += 1
            return False
        key = entry.tokens.tobytes()
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.n_bytes
            while self._entries and self._bytes + entry.n_bytes > self.budget:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= gone.n_bytes
                self._evictions += 1
            self._entries[key] = entry
            self._bytes += entry.n_bytes
        return True

    def lookup(self, tokens: Sequence[int] | np.ndarray,
               min_tokens: int = 1) -> tuple[CachedPrefix, int] | None:
        """The entry sharing the longest usable prefix with ``tokens``.

        Args:
            tokens: the new prompt.
            min_tokens: fewer usable tokens than this count as a miss (the caller
                passes what its slot already holds, so that only a gain is a hit).

        Returns:
            ``(entry, n_keep)``: restore ``entry`` and keep its first ``n_keep`` tokens
            (at most ``len(tokens) - 1``, a multiple of ``page``); or None (a miss).
        """
        prompt = as_tokens(tokens)
        limit = len(prompt) - 1  # the last prompt token is evaluated for its logits
        with self._lock:
            best: tuple[CachedPrefix, int] | None = None
            for entry in self._entries.values():
                n_common = min(common_prefix(entry.tokens, prompt), limit)
                n_common -= n_common % self.page
                n_keep = usable_prefix(len(entry.tokens), n_common, self.n_swa,
                                       entry.checkpoint_positions)
                if n_keep >= max(min_tokens, 1) and (best is None or n_keep > best[1]):
                    best = (entry, n_keep)
            if best is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(best[0].tokens.tobytes())
            return best

    def entries(self) -> list[CachedPrefix]:
        """Every entry, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(len(self._entries), self._bytes, self.budget,
                                    self._hits, self._misses, self._evictions, self._refused)

    def __len__(self) -> int:
        return len(self._entries)
