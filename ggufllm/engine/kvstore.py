"""The RAM prefix cache wired to one context: the scheduler's two KV hooks and the file.

:class:`KVStore` plugs into the slot table (``on_evict`` / ``on_place``):

- a slot about to be cut back or reused saves its sequence state to the RAM cache
  (when restoring it later would be exact for this model, see
  :func:`~ggufllm.engine.kvcache.restore_is_exact`);
- a slot chosen for a prompt gets a RAM entry restored when that entry shares a longer
  prefix with the prompt than the slot holds.

Every method that touches the context runs on the thread that owns it (the scheduler).
Loading a file only fills the RAM cache: entries reach the context on placement, where
a failed restore leaves the slot empty and the prompt is evaluated from the start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import llama_cpp.llama_cpp as lib

from .kvcache import PrefixCache, seq_state_get, seq_state_set
from .kvfile import KVCacheIdentity, load_prefixes, save_prefixes

__all__ = ["KVStore", "SlotLike"]

logger = logging.getLogger(__name__)


class SlotLike(Protocol):
    """What the store needs of a slot: its sequence id and the tokens it holds."""

    seq: int
    tokens: list[int]


class KVStore:
    """Saves evicted slots to a :class:`PrefixCache` and restores them on placement.

    Args:
        ctx: the ``llama_context`` pointer (owned elsewhere; used on its owner's thread).
        cache: the RAM cache (its budget, window and flash-attention policy).
        identity: what saved state is valid for (stamped on files, checked on load).
    """

    def __init__(self, ctx: lib.llama_context_p, cache: PrefixCache,
                 identity: KVCacheIdentity) -> None:
        self._ctx = ctx
        self._mem = lib.llama_get_memory(ctx)
        self.cache = cache
        self.identity = identity
        self.tokens_restored = 0
        self.restore_failures = 0

    # -- the two hooks ---------------------------------------------------------

    def on_evict(self, slot: SlotLike) -> None:
        """Saves what ``slot`` holds before the scheduler cuts it back."""
        if self.cache.budget and self.cache.accepts(len(slot.tokens)):
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
            slot.tokens = []
            return 0
        if n_keep < len(entry.tokens):
            lib.llama_memory_seq_rm(self._mem, slot.seq, n_keep, -1)
        slot.tokens = entry.tokens[:n_keep].tolist()
        self.tokens_restored += n_keep
        return n_keep

    def keep(self, slot: SlotLike) -> bool:
        """Copies ``slot``'s state into the RAM cache (False: not kept)."""
        if not slot.tokens:
            return False
        try:
            state = seq_state_get(self._ctx, slot.seq)
        except RuntimeError:
            logger.warning("could not save the state of slot %d", slot.seq, exc_info=True)
            return False
        return self.cache.put(slot.tokens, state)

    # -- files -------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], slots: Iterable[SlotLike] = ()) -> int:
        """Writes the RAM cache, after adding what ``slots`` hold, to ``path`` atomically.

        Returns:
            How many prefixes the file holds.

        Raises:
            OSError: the file could not be written (an existing file is unchanged).
        """
        for slot in slots:
            if self.cache.accepts(len(slot.tokens)):
                self.keep(slot)
        entries = self.cache.entries()
        save_prefixes(path, entries, self.identity)
        return len(entries)

    def load(self, path: str | os.PathLike[str]) -> int:
        """Adds every prefix of a saved file to the RAM cache.

        Returns:
            How many prefixes were kept (entries beyond the budget, or whose restore
            would not be exact here, are skipped).

        Raises:
            KVCacheMismatchError: the file is for another model, build or setting.
            KVCacheError: the file is missing, truncated or corrupt.
        """
        return sum(self.cache.put(e.tokens, e.state) for e in load_prefixes(path, self.identity))

    def stats(self) -> dict[str, Any]:
        """RAM entries and bytes, hits and misses, for ``get_model_info()["kv_cache"]``."""
        s = self.cache.stats()
        return {"ram_entries": s.entries, "ram_bytes": s.bytes, "ram_budget": s.budget,
                "ram_hits": s.hits, "ram_misses": s.misses, "ram_evictions": s.evictions,
                "ram_tokens_restored": self.tokens_restored,
                "ram_restore_failures": self.restore_failures}
