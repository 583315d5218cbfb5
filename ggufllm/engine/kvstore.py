"""The RAM prefix cache wired to one context: the scheduler's two KV hooks and the file.

:class:`KVStore` plugs into the slot table (``on_evict`` / ``on_place``):

- a slot about to be cut back or reused saves its sequence state to the RAM cache
  (with ``KV_REUSE=exact``, only when restoring it later would be exact for this
  model, see :func:`~ggufllm.engine.kvcache.restore_is_exact`);
- a slot chosen for a prompt gets a RAM entry restored when that entry shares a longer
  prefix with the prompt than the slot holds.

With ``KV_REUSE=fast`` a saved sequence of a sliding-window model also carries window
checkpoints (:class:`~ggufllm.engine.kvcache.CachedPrefix`) at the page boundaries of
its prompt's last :data:`CHECKPOINT_TAIL` tokens: a restored sequence holds only its last
window of cells, so without them it could only be reused whole, while a follow-up
question over the same document shares the prompt only up to where its question
begins. They are taken when the state is saved, by cutting the sequence back one
checkpoint at a time (the cells past it are being dropped anyway).

Every method that touches the context runs on the thread that owns it (the scheduler);
there a slot's state is measured before it is copied, and copied once. Loading a file
only fills the RAM cache (with as many of its newest entries as the budget holds):
entries reach the context on placement, where a failed restore leaves the slot empty and
the prompt is evaluated from the start. Saving writes the RAM cache and the idle slots.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import llama_cpp.llama_cpp as lib

from .kvcache import CachedPrefix, PrefixCache, as_tokens, seq_state_get, seq_state_set, seq_state_size
from .kvfile import KVCacheIdentity, read_prefixes, save_prefixes
from .slots import PAGE

__all__ = ["KVStore", "SlotLike", "CHECKPOINT_TAIL", "checkpoint_positions"]

logger = logging.getLogger(__name__)

# window checkpoints cover a prompt's last this many tokens (a question and its template)
CHECKPOINT_TAIL = 4 * PAGE


def _kept_for_follow_ups(n_prompt: int) -> int:
    """A cut that keeps at least this much of a prompt of ``n_prompt`` tokens is taken for
    another question over the same document: the prompt's first half and all of it but
    its last :data:`CHECKPOINT_TAIL` tokens."""
    return max(n_prompt // 2, n_prompt - CHECKPOINT_TAIL)


def checkpoint_positions(n_prompt: int, n_tokens: int, n_shared: int = 0) -> list[int]:
    """Where a saved sequence of ``n_tokens`` whose prompt ended at ``n_prompt`` gets
    window checkpoints: the page boundaries of the prompt's last :data:`CHECKPOINT_TAIL`
    tokens, the prompt's end, and where its question began (``n_shared``, when known: a
    follow-up over the same document reuses all of it but its own question) (descending,
    all below ``n_tokens``)."""
    end = min(n_prompt or n_tokens, n_tokens)
    first = max(PAGE, end - CHECKPOINT_TAIL)
    positions = set(range(first + (-first) % PAGE, end + 1, PAGE))
    positions.add(end)
    if n_shared:
        positions.add(n_shared)
    return sorted((p for p in positions if 0 < p < n_tokens), reverse=True)


class SlotLike(Protocol):
    """What the store needs of a slot: its sequence id, the tokens it holds, and how many
    of them hold exactly the K/V a cold evaluation computes (whole prompt pages)."""

    seq: int
    tokens: list[int]
    n_exact: int
    n_prompt: int
    n_shared: int

    def cut(self, keep: int) -> None: ...

    def replace(self, tokens: list[int], n_exact: int) -> None: ...


class KVStore:
    """Saves evicted slots to a :class:`PrefixCache` and restores them on placement.

    Args:
        ctx: the ``llama_context`` pointer (owned elsewhere; used on its owner's thread).
        cache: the RAM cache (its budget, window and flash-attention policy).
        identity: what saved state is valid for (stamped on files, checked on load), or
            a function computing it (it hashes the model's header: done on first use).
    """

    def __init__(self, ctx: lib.llama_context_p, cache: PrefixCache,
                 identity: KVCacheIdentity | Callable[[], KVCacheIdentity]) -> None:
        self._ctx = ctx
        self._n_swa = cache.n_swa
        self._mem = lib.llama_get_memory(ctx)
        self.cache = cache
        self._identity = (identity if callable(identity) else lambda: identity)
        self.tokens_restored = 0
        self.restore_failures = 0
        self.load_skipped = 0

    @functools.cached_property
    def identity(self) -> KVCacheIdentity:
        return self._identity()

    # -- the two hooks ---------------------------------------------------------

    def on_evict(self, slot: SlotLike, keep: int) -> None:
        """Saves what ``slot`` holds before the scheduler cuts it back to ``keep``.

        Exact: nothing is saved when the cut keeps the whole exact prefix; the tokens past
        it (a last partial page, generated tokens) are dropped here first, so only what a
        cold evaluation would compute goes to the RAM cache. Fast: the whole sequence is
        saved, unless the cut keeps most of its prompt (another question over the same
        document: the slot itself still holds what a later prompt could reuse).
        """
        if not self.cache.budget:
            return
        if self.cache.exact:
            if keep < slot.n_exact and self.cache.accepts(slot.n_exact):
                self.keep(slot)
        elif keep < _kept_for_follow_ups(slot.n_prompt or len(slot.tokens)):
            self.keep(slot, floor=keep)

    def on_place(self, slot: SlotLike, prompt: Sequence[int], n_reuse: int) -> int:
        """Restores a RAM entry into ``slot`` when it shares more of ``prompt``.

        Returns:
            How many prompt tokens the slot now holds (``slot.tokens`` is updated).
        """
        hit = self.cache.lookup(prompt, min_tokens=n_reuse + 1)
        if hit is None:
            return n_reuse
        entry, n_keep = hit
        if not self.restore(slot, entry, n_keep):
            self.restore_failures += 1
            logger.warning("could not restore a cached prefix of %d tokens into slot %d; "
                           "evaluating the prompt", len(entry.tokens), slot.seq)
            return 0
        self.tokens_restored += n_keep
        return n_keep

    def restore(self, slot: SlotLike, entry: CachedPrefix, n_keep: int) -> bool:
        """Puts ``entry`` into ``slot`` cut back to ``n_keep`` tokens (its whole length, or
        what :func:`~.kvcache.usable_prefix` allows: past the window, a checkpoint's
        position, whose window cells replace the restored ones). False (the slot left
        empty) when llama.cpp refused the state."""
        n_entry = len(entry.tokens)
        ok = seq_state_set(self._ctx, slot.seq, entry.state, n_entry)
        if ok and n_keep < n_entry:
            lib.llama_memory_seq_rm(self._mem, slot.seq, n_keep, -1)
            if self._n_swa and n_entry > self._n_swa:
                window = dict(entry.checkpoints).get(n_keep)
                ok = window is not None and seq_state_set(self._ctx, slot.seq, window, n_keep,
                                                          window=True)
        if not ok:
            lib.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
            slot.replace([], 0)
            return False
        slot.replace(entry.tokens[:n_keep].tolist(), n_keep)
        return True

    def keep(self, slot: SlotLike, floor: int = 0) -> bool:
        """Copies what ``slot`` holds into the RAM cache (see :meth:`snapshot`).

        Returns:
            False if nothing was kept (nothing exact, a window that no longer holds
            what the prefix's next token reads, or more than the cache's budget: then
            nothing is copied).
        """
        entry = self.snapshot(slot, max_bytes=self.cache.budget, floor=floor)
        return entry is not None and self.cache.put(entry.tokens, entry.state,
                                                     entry.checkpoints)

    def snapshot(self, slot: SlotLike, max_bytes: int | None = None,
                 floor: int = 0) -> CachedPrefix | None:
        """Copies what ``slot`` holds out of the context: with ``KV_REUSE=exact`` its exact
        prefix (the slot is cut back to it first), else all of it and its window
        checkpoints above ``floor`` (taking them cuts the slot back to the lowest).

        Args:
            max_bytes: copy nothing when the prefix (state and tokens) would take more;
                its size is asked of llama.cpp first, so a prefix too big costs no copy.
            floor: no checkpoints at or below this position (the caller keeps those
                tokens in the slot).

        Returns:
            The prefix, or None: nothing exact, a restore that would not be exact, a
            window that no longer holds what the prefix's next token reads, or too big.
        """
        n = slot.n_exact if self.cache.exact else len(slot.tokens)
        if not self.cache.accepts(n):
            return None
        if len(slot.tokens) > n:
            lib.llama_memory_seq_rm(self._mem, slot.seq, n, -1)
            slot.cut(n)
        if not self._holds(slot.seq, n):
            return None  # a sliding window already dropped cells this prefix needs
        size = seq_state_size(self._ctx, slot.seq)
        if max_bytes is not None and 4 * n + size > max_bytes:
            return None
        tokens = as_tokens(slot.tokens)  # a copy: taking checkpoints cuts the slot
        try:
            state = seq_state_get(self._ctx, slot.seq, size)
            checkpoints = () if self.cache.exact else self._checkpoints(slot, floor)
        except RuntimeError:
            logger.warning("could not save the state of slot %d", slot.seq, exc_info=True)
            return None
        return CachedPrefix(tokens, state, checkpoints)

    def _holds(self, seq: int, n: int) -> bool:
        """Whether sequence ``seq`` holds positions ``0..n-1`` as far as its next token
        reads them (the window check the scheduler makes before reuse, llama-server's)."""
        pos_min = lib.llama_memory_seq_pos_min(self._mem, seq)
        pos_max = lib.llama_memory_seq_pos_max(self._mem, seq)
        needed_from = max(0, n - self._n_swa) if self._n_swa else 0
        return pos_max == n - 1 and 0 <= pos_min <= needed_from

    def _checkpoints(self, slot: SlotLike, floor: int) -> tuple[tuple[int, bytearray], ...]:
        """The window cells of ``slot`` cut back to each of :func:`checkpoint_positions`
        above ``floor``, lowest first (the slot ends cut back to the lowest taken)."""
        n = len(slot.tokens)
        if not self._n_swa or n <= self._n_swa:
            return ()
        taken = []
        for p in checkpoint_positions(slot.n_prompt, n, slot.n_shared):
            if p <= floor:
                break
            lib.llama_memory_seq_rm(self._mem, slot.seq, p, -1)
            slot.cut(p)
            if not self._holds(slot.seq, p):
                break
            taken.append((p, seq_state_get(self._ctx, slot.seq, window=True)))
        return tuple(reversed(taken))

    # -- files -------------------------------------------------------------------

    def keep_slots(self, slots: Iterable[SlotLike]) -> int:
        """Copies what each of ``slots`` (idle ones) holds into the RAM cache (see
        :meth:`keep`); on the context's thread. Returns how many were kept."""
        return sum(self.keep(slot) for slot in slots)

    def snapshot_slots(self, slots: Iterable[SlotLike]) -> list[CachedPrefix]:
        """What each of ``slots`` holds (idle ones), for :meth:`save`, whatever the RAM
        budget; on the context's thread. Exact: each is cut back to its exact prefix. Fast:
        each is put back whole after its checkpoints were taken, as if restored, and the
        entry goes to the RAM cache too (a restored sequence cut back needs them)."""
        entries = []
        for slot in slots:
            entry = self.snapshot(slot)
            if entry is None:
                continue
            entries.append(entry)
            if len(slot.tokens) < len(entry.tokens):
                # whole again; cut back later, it needs its checkpoints: the RAM cache has them
                self.restore(slot, entry, len(entry.tokens))
                if self.cache.budget and entry.n_bytes <= self.cache.budget:
                    self.cache.put(entry.tokens, entry.state, entry.checkpoints)
        return entries

    def save(self, path: str | os.PathLike[str], slots: Sequence[CachedPrefix] = ()) -> int:
        """Writes the RAM cache and ``slots`` (from :meth:`snapshot_slots`) to ``path``
        atomically; any thread (it reads no context).

        Returns:
            How many prefixes the file holds.

        Raises:
            OSError: the file could not be written (an existing file is unchanged).
        """
        newer = {e.tokens.tobytes() for e in slots}
        entries = [e for e in self.cache.entries() if e.tokens.tobytes() not in newer]
        entries += slots  # the file lists the least recently used first
        save_prefixes(path, entries, self.identity)
        return len(entries)

    def load(self, path: str | os.PathLike[str], *, trusted: bool = False) -> int:
        """Adds the newest prefixes of a saved file that the RAM cache holds to it.

        Only those are read into memory. When some are left out (beyond the budget, or
        whose restore would not be exact here), a warning says so and
        ``stats()["ram_load_skipped"]`` counts them.

        Args:
            trusted: accept a file signed with another user's key (see
                :func:`~.kvfile.read_prefixes`).

        Returns:
            How many of the file's prefixes the RAM cache holds after the load.

        Raises:
            KVCacheMismatchError: the file is for another model, build, setting or format.
            KVCacheUntrustedError: the file was not signed with this user's key.
            KVCacheError: the file is missing, truncated or corrupt.
        """
        contents = read_prefixes(path, self.identity, trusted=trusted, choose=self._fitting)
        for e in contents.entries:
            self.cache.put(e.tokens, e.state, e.checkpoints)
        kept = len({e.tokens.tobytes() for e in contents.entries if self.cache.holds(e.tokens)})
        skipped = contents.n_entries - kept
        if skipped:
            self.load_skipped += skipped
            logger.warning("kept %d of the %d prefixes in %s: the others do not fit the RAM "
                           "cache (KV_CACHE_RAM_MB=%d) or would not restore exactly here",
                           kept, contents.n_entries, path, self.cache.budget >> 20)
        return kept

    def _fitting(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        """The newest entries (a file lists the least recently used first) that the RAM
        cache accepts and that fit its budget together."""
        chosen, total = [], 0
        for i in range(len(sizes) - 1, -1, -1):
            n_tokens, n_state = sizes[i]
            if self.cache.fits(n_tokens, n_state) and total + 4 * n_tokens + n_state <= self.cache.budget:
                chosen.append(i)
                total += 4 * n_tokens + n_state
        return chosen

    def stats(self) -> dict[str, Any]:
        """RAM entries and bytes, hits and misses, restores, and prefixes of loaded files
        left out (``ram_load_skipped``), for ``get_model_info()["kv_cache"]``."""
        s = self.cache.stats()
        return {"ram_entries": s.entries, "ram_bytes": s.bytes, "ram_budget": s.budget,
                "ram_hits": s.hits, "ram_misses": s.misses, "ram_evictions": s.evictions,
                "ram_tokens_restored": self.tokens_restored,
                "ram_restore_failures": self.restore_failures,
                "ram_load_skipped": self.load_skipped}
