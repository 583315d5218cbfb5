"""Slot bookkeeping: which tokens each sequence of the KV cache holds, and where a prompt goes.

A slot is one llama.cpp sequence id of the unified KV cache. ``Slot.tokens`` is
the only record of what that sequence holds (positions ``0 .. len - 1``); the
scheduler appends to it only after ``llama_decode`` has stored a token.

Placing a prompt follows llama-server: the free slot whose cached tokens share
the longest prefix with the prompt (when that prefix is at least a tenth of the
prompt), else the least recently used free slot. A longer prefix held by another
slot is shared with ``llama_memory_seq_cp`` (metadata only in a unified cache).
Unlike llama-server, a prompt whose best free slot would lose more tokens than it
keeps (the same instructions, then another document) goes to an empty slot when
there is one, with the shared part copied: both documents stay cached.
With ``KV_REUSE=exact``, only whole prompt pages evaluated on an exact prefix are
reused (``Slot.n_exact``); with ``fast`` (the default) any prefix whose tokens
match is, generated tokens included, as llama-server reuses them. On this CPU build a
token's K/V and logits depend on the shape of the batch it was evaluated in (the matmul
kernels round differently for different row counts; measured in ``benchmarks/batch_invariance.py``; the same
batches give the same logits: ``tests/test_engine_invariance.py``), so prompts
are evaluated in pages: batches
of ``PAGE`` tokens starting at multiples of ``PAGE`` (the last one shorter). A
token is then always computed in the same batch, whatever was cached before it,
and a cached answer equals a cold one. (Pages evaluated while other requests run
share their batch with those requests' rows; they are kept and reused all the
same, as llama-server reuses them: their K/V are those tokens' values, rounded
as that batch's kernels round.) Whole pages of a prompt are exact; the last
partial page and the generated tokens (decoded one row at a time) are not, and
are evaluated again when a later prompt contains them.

Before a prefix is reused, the sequence's smallest position is checked as
llama-server does: a sliding-window layer may have dropped cells the next token
still attends to, and then the prompt is evaluated again from the start.

Two hooks let a host-memory cache of prefixes plug in:

- ``on_evict(slot, keep)`` runs just before a slot's cached tokens are cut back to
  ``keep`` (at most ``slot.n_exact``) or dropped (its state can be saved with ``llama_state_seq_get_data``);
- ``on_place(slot, prompt, n_reuse) -> n_reuse`` runs once a free slot was chosen
  for ``prompt`` with ``n_reuse`` tokens already in it (that passed the window
  check); it may restore a longer prefix into ``slot.seq``
  (``llama_state_seq_set_data``), set ``slot.tokens`` to what it restored and return
  the new count, which is checked again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .native import NativeContext

__all__ = ["Slot", "SlotTable", "Placement", "EvictHook", "PlaceHook", "PAGE", "reusable"]

logger = logging.getLogger(__name__)

# the unit of exact prompt reuse: prompts are evaluated in batches of PAGE tokens
# from multiples of PAGE (64: little re-evaluation lost, small batches still fast on CPU)
PAGE = 64
# llama-server's slot-similarity threshold: reuse a slot for its prefix only when
# the prefix is at least this share of the prompt (else take the LRU slot).
_MIN_SIMILARITY = 0.10


@dataclass(eq=False)
class Slot:
    """One sequence of the KV cache.

    Attributes:
        seq: the llama.cpp sequence id.
        tokens: the tokens whose K/V the sequence holds, positions 0..len-1.
        n_exact: how many leading tokens were evaluated as whole prompt pages on an
            exact prefix (a multiple of ``PAGE``); alone, exactly the K/V a cold
            evaluation computes.
        busy: a request is using it.
        last_used: a counter value (least recently used slots are evicted first).
    """

    seq: int
    tokens: list[int] = field(default_factory=list)
    n_exact: int = 0
    busy: bool = False
    last_used: int = 0
    n_prompt: int = 0  # where the last prompt evaluated in it ended (its answer follows)
    n_shared: int = 0  # where that prompt's question began (Prompt.n_shared; 0: not known)
    # leading cells this slot shares with others (llama_memory_seq_cp): slot -> how many
    shares: dict[Slot, int] = field(default_factory=dict, repr=False)

    def cut(self, keep: int) -> None:
        """Forgets the tokens past ``keep`` (the caller removed their cells)."""
        del self.tokens[keep:]
        self.n_exact = min(self.n_exact, keep)
        self.n_prompt = min(self.n_prompt, keep)
        self.n_shared = min(self.n_shared, keep)
        for other, n in list(self.shares.items()):
            if n > keep:
                self.share(other, keep)

    def replace(self, tokens: list[int], n_exact: int) -> None:
        """The sequence's cells were replaced (a restored state): it now holds ``tokens``."""
        for other in list(self.shares):
            self.share(other, 0)
        self.tokens = tokens
        self.n_exact = n_exact
        self.n_prompt = len(tokens)
        self.n_shared = 0

    def share(self, other: Slot, n: int) -> None:
        """Records that this slot and ``other`` hold the same first ``n`` cells."""
        if n > 0 and other is not self:
            self.shares[other] = other.shares[self] = n
        else:
            self.shares.pop(other, None)
            other.shares.pop(self, None)


@dataclass(frozen=True)
class Placement:
    """Where a prompt goes: its slot and how many prompt tokens it already holds."""

    slot: Slot
    n_reuse: int
    shared_from: int | None  # seq id the prefix was copied from, if another slot's


EvictHook = Callable[[Slot, int], None]
PlaceHook = Callable[[Slot, Sequence[int], int], int]


def reusable(slot: Slot, prompt: Sequence[int], limit: int, exact: bool = True) -> int:
    """How many leading tokens of ``prompt`` ``slot`` holds: with ``exact``, exactly (a
    multiple of ``PAGE``, within ``slot.n_exact``), else any matching prefix."""
    if not exact:
        return common_prefix(slot.tokens, prompt, limit)
    n = common_prefix(slot.tokens, prompt, min(limit, slot.n_exact))
    return n - n % PAGE


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of ``a`` and ``b``, at most ``limit``."""
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotTable:
    """The slots of one context and the rules that place prompts in them.

    Only the scheduler thread calls it.

    Args:
        ctx: the context whose KV cache the slots index.
        n_slots: number of slots (the context's ``n_seq_max``).
        n_swa: the model's sliding-window size (0: no windowed layers).
        exact: reuse only exact prefixes (``KV_REUSE=exact``).
    """

    def __init__(self, ctx: NativeContext, n_slots: int, n_swa: int, exact: bool = True) -> None:
        self._ctx = ctx
        self.slots = [Slot(seq) for seq in range(n_slots)]
        self._n_swa = n_swa
        self.exact = exact
        self._clock = 0
        self.on_evict: EvictHook | None = None
        self.on_place: PlaceHook | None = None
        self.hits = self.misses = self.tokens_reused = self.window_resets = 0

    # -- placing a prompt ------------------------------------------------------

    def place(self, prompt: Sequence[int]) -> Placement | None:
        """Chooses a free slot for ``prompt`` and prepares its cached prefix.

        Returns:
            The placement (the slot is marked busy), or None when no slot is free.
        """
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        limit = len(prompt) - 1  # the last prompt token is always evaluated (its logits)
        slot, n = self._choose(free, prompt, limit)
        shared_from = None
        # a running request's slot, or an idle one kept for its document (see _choose)
        donor = max((s for s in self.slots if s is not slot and (s.busy or s.tokens)),
                    default=None, key=lambda s: reusable(s, prompt, limit, self.exact))
        if donor is not None:
            n_donor = reusable(donor, prompt, limit, self.exact)
            if n_donor > n:  # a running request holds a longer prefix: share its cells
                self._drop(slot, 0)
                self._ctx.seq_cp(donor.seq, slot.seq, 0, n_donor)
                slot.tokens = list(prompt[:n_donor])
                slot.n_exact = n_donor
                for other, m in list(donor.shares.items()):
                    slot.share(other, min(m, n_donor))
                slot.share(donor, n_donor)
                n, shared_from = n_donor, donor.seq
        if n < len(slot.tokens):
            self._drop(slot, n)
        # the cells in the slot first (a restored sequence holds only its last window of
        # cells: cut back, it may not hold what the next token reads), then the RAM cache
        n = self._check_window(slot, n)
        if self.on_place is not None:
            held = n
            n = self.on_place(slot, prompt, n)
            if n != held:
                n = self._check_window(slot, n)
        slot.busy = True
        self._touch(slot)
        if n > 0:
            self.hits += 1
            self.tokens_reused += n
        else:
            self.misses += 1
        return Placement(slot, n, shared_from)

    def _choose(self, free: list[Slot], prompt: Sequence[int], limit: int) -> tuple[Slot, int]:
        best = max(free, key=lambda s: (reusable(s, prompt, limit, self.exact), s.last_used))
        n = reusable(best, prompt, limit, self.exact)
        if n > 0 and n >= _MIN_SIMILARITY * len(prompt):
            empty = [s for s in free if not s.tokens]
            if empty and len(best.tokens) - n > n:
                # reusing it would cut away more than it keeps (a shared header, another
                # document after it): an empty slot takes the prompt, the header is copied
                # into it (place's donor), and the other document stays for its follow-ups
                return empty[0], 0
            return best, n
        lru = min(free, key=lambda s: (bool(s.tokens), s.last_used))  # empty slots first
        return lru, reusable(lru, prompt, limit, self.exact)

    def _check_window(self, slot: Slot, n: int) -> int:
        """Keeps ``n`` cached tokens only if the cache still holds what the next token reads."""
        if n == 0:
            if self._ctx.seq_pos_max(slot.seq) >= 0:  # cells nothing booked: never reuse them
                self._drop(slot, 0)
            return 0
        ctx = self._ctx
        pos_min, pos_max = ctx.seq_pos_min(slot.seq), ctx.seq_pos_max(slot.seq)
        # the next token (position n) attends to positions > n - n_swa on windowed layers
        needed_from = max(0, n - self._n_swa) if self._n_swa > 0 else 0
        if pos_max == n - 1 and 0 <= pos_min <= needed_from:
            return n
        logger.debug("slot %d: cache holds positions %d..%d, %d tokens needed from %d: "
                     "evaluating the prompt again", slot.seq, pos_min, pos_max, n, needed_from)
        self.window_resets += 1
        self._drop(slot, 0)
        return 0

    # -- releasing and evicting ------------------------------------------------

    def release(self, slot: Slot) -> None:
        """The request using ``slot`` has left; its tokens stay cached."""
        slot.busy = False
        self._touch(slot)

    def evict_one(self) -> bool:
        """Drops the cached tokens of the least recently used idle slot (KV cells are short).

        Returns:
            False when no idle slot holds anything.
        """
        idle = [s for s in self.slots if not s.busy and s.tokens]
        if not idle:
            return False
        self._drop(min(idle, key=lambda s: s.last_used), 0)
        return True

    def drop_past(self, slot: Slot) -> None:
        """Removes cells ``slot``'s sequence holds past ``slot.tokens`` (what a failed
        ``llama_decode`` may have stored); cuts it to nothing if that cannot be done."""
        if not self._ctx.seq_rm(slot.seq, len(slot.tokens), -1):
            self._ctx.seq_rm(slot.seq, 0, -1)
            slot.cut(0)

    def clear_idle(self) -> int:
        """Drops what every idle slot holds; returns how many tokens were dropped."""
        dropped = 0
        for slot in self.slots:
            if not slot.busy and slot.tokens:
                dropped += len(slot.tokens)
                self._drop(slot, 0)
        return dropped

    def _drop(self, slot: Slot, keep: int) -> None:
        """Cuts ``slot`` back to its first ``keep`` tokens (hook (a) first)."""
        if len(slot.tokens) > keep and self.on_evict is not None:
            self.on_evict(slot, keep)
        if not self._ctx.seq_rm(slot.seq, keep, -1):
            self._ctx.seq_rm(slot.seq, 0, -1)
            keep = 0
        slot.cut(keep)

    def _touch(self, slot: Slot) -> None:
        self._clock += 1
        slot.last_used = self._clock

    # -- facts -----------------------------------------------------------------

    def cells_in_use(self) -> int:
        """KV cells the slots hold, a prefix two slots share counted once.

        Safe from any thread: it counts a snapshot of each slot, as the scheduler thread
        changes them meanwhile (``len`` and ``dict`` copy a builtin in one step under the GIL).
        """
        held = [(slot, len(slot.tokens), dict(slot.shares)) for slot in self.slots]
        total, seen = 0, {}
        for slot, n_tokens, shares in held:
            shared = max((min(n, n_tokens, seen[o]) for o, n in shares.items() if o in seen),
                         default=0)
            total += n_tokens - shared
            seen[slot] = n_tokens
        return total

    def stats(self) -> dict[str, int]:
        """Counters for ``get_model_info()["kv_cache"]``."""
        return {
            "hits": self.hits, "misses": self.misses, "tokens_reused": self.tokens_reused,
            "window_resets": self.window_resets,
            "tokens_in_use": self.cells_in_use(),
            "prefixes_in_slots": sum(1 for s in self.slots if s.tokens),
        }
