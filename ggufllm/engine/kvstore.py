"""The RAM prefix cache wired to one context: the scheduler's two KV hooks and the file.

:class:`KVStore` plugs into the slot table (``on_evict`` / ``on_place``):

- a slot about to be cut back or reused saves its sequence state to the RAM cache
  (when restoring it later would be exact for this model, see
  :func:`~ggufllm.engine.kvcache.restore_is_exact`);
- a slot chosen for a prompt gets a RAM entry restored when that entry shares a longer
  prefix with the prompt than the slot holds.

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

__all__ = ["KVStore", "SlotLike"]

logger = logging.getLogger(__name__)


class SlotLike(Protocol):
    """What the store needs of a slot: its sequence id, the tokens it holds, and how many
    of them hold exactly the K/V a cold evaluation computes (whole prompt pages)."""

    seq: int
    tokens: list[int]
    n_exact: int

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
        """Saves the exact prefix of ``slot`` before the scheduler cuts it back to ``keep``.

        Nothing is saved when the cut keeps the whole exact prefix. The scheduler cuts a
        slot back to at most its exact prefix (``n_exact``), so the tokens past it (a
        last partial page, generated tokens) are dropped here first: only what a cold
        evaluation would compute goes to the RAM cache.
        """
        if keep < slot.n_exact and self.cache.budget and self.cache.accepts(slot.n_exact):
            self.keep(slot)

    def on_place(self, slot: SlotLike, prompt: Sequence[int], n_reuse: int) -> int:
        """Restores a RAM entry into ``slot`` when it shares more of ``prompt``.

        Returns:
            How many prompt tokens the slot now holds (``slot.tokens`` is updated).
        """
        hit = self.cache.lookup(prompt, min_tokens=n_reuse + 1)
        if hit is None:
            return n_reuse
        entry, n_keep = hit
        if not seq_state_set(self._ctx, slot.seq, entry.state, len(entry.tokens)):
            self.restore_failures += 1
            logger.warning("could not restore a cached prefix of %d tokens into slot %d; "
                           "evaluating the prompt", len(entry.tokens), slot.seq)
            slot.replace([], 0)
            return 0
        if n_keep < len(entry.tokens):
            lib.llama_memory_seq_rm(self._mem, slot.seq, n_keep, -1)
        slot.replace(entry.tokens[:n_keep].tolist(), n_keep)
        self.tokens_restored += n_keep
        return n_keep

    def keep(self, slot: SlotLike) -> bool:
        """Cuts ``slot`` back to its exact prefix and copies that into the RAM cache.

        Returns:
            False if nothing was kept (nothing exact, a window that no longer holds
            what the prefix's next token reads, or more than the cache's budget: then
            nothing is copied).
        """
        entry = self.snapshot(slot, max_bytes=self.cache.budget)
        return entry is not None and self.cache.put(entry.tokens, entry.state)

    def snapshot(self, slot: SlotLike, max_bytes: int | None = None) -> CachedPrefix | None:
        """Cuts ``slot`` back to its exact prefix and copies that out of the context.

        Args:
            max_bytes: copy nothing when the prefix (state and tokens) would take more;
                its size is asked of llama.cpp first, so a prefix too big costs no copy.

        Returns:
            The prefix, or None: nothing exact, a restore that would not be exact, a
            window that no longer holds what the prefix's next token reads, or too big.
        """
        n = slot.n_exact
        if not self.cache.accepts(n):
            return None
        if len(slot.tokens) > n:
            lib.llama_memory_seq_rm(self._mem, slot.seq, n, -1)
            slot.cut(n)
        pos_min = lib.llama_memory_seq_pos_min(self._mem, slot.seq)
        pos_max = lib.llama_memory_seq_pos_max(self._mem, slot.seq)
        # the window check the scheduler makes before reusing a prefix (llama-server's)
        needed_from = max(0, n - self._n_swa) if self._n_swa else 0
        if pos_max != n - 1 or not 0 <= pos_min <= needed_from:
            return None  # a sliding window already dropped cells this prefix needs
        size = seq_state_size(self._ctx, slot.seq)
        if max_bytes is not None and 4 * n + size > max_bytes:
            return None
        try:
            state = seq_state_get(self._ctx, slot.seq, size)
        except RuntimeError:
            logger.warning("could not save the state of slot %d", slot.seq, exc_info=True)
            return None
        return CachedPrefix(as_tokens(slot.tokens), state)

    # -- files -------------------------------------------------------------------

    def keep_slots(self, slots: Iterable[SlotLike]) -> int:
        """Copies the exact prefix of each of ``slots`` (idle ones: each is cut back to
        it) into the RAM cache; on the context's thread. Returns how many were kept."""
        return sum(self.keep(slot) for slot in slots if self.cache.accepts(slot.n_exact))

    def snapshot_slots(self, slots: Iterable[SlotLike]) -> list[CachedPrefix]:
        """The exact prefix of each of ``slots`` (idle ones: each is cut back to it), for
        :meth:`save`, whatever the RAM budget; on the context's thread."""
        return [e for e in map(self.snapshot, slots) if e is not None]

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
            self.cache.put(e.tokens, e.state)
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
