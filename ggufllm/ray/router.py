"""The document-affine request router (a Ray Serve ``RequestRouter``).

Each request carries its affinity key (:mod:`.keys`: hashes of its prompt's
pages) as the ``affinity`` keyword of the replica call. The router remembers,
for each page hash, the replica it last sent that page to. For a new request it
looks for the longest run of its pages seen before, on a replica still running:

- that replica gets the request while it has capacity: fewer requests than its
  slots (``N_PARALLEL``: the request starts at once) and at most
  ``max_imbalance`` more than the least-loaded replica (bounded load: a hot
  document spills to another replica, which then holds it too and takes its
  turn, instead of queueing on one);
- otherwise, or when the run is shorter than a tenth of the prompt's pages (the
  slot table's own threshold for reusing a slot), power of two choices: two
  random replicas, the shorter queue wins (Ray's default policy); on a tie, the one
  that holds fewer pages, so that new documents spread over the replicas and the
  cluster's KV caches hold each document once rather than every document each.

Queue lengths are Ray's own (the replica-reported counts Ray caches, plus what
this router sent since); the page map lives in this router's process and is
learnt from what it routes: no shared state beyond what Ray provides. With
several ingress replicas each learns its own map; they agree on where a
document went as soon as each has routed it once.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

__all__ = ["PrefixAffinityRouter", "AFFINITY_KWARG", "MIN_SHARE"]

logger = logging.getLogger(__name__)

AFFINITY_KWARG = "affinity"
# the slot table's rule (engine/slots.py): a prefix is worth its replica when it is at
# least a tenth of the prompt; shorter (the shared instructions alone) routes by load
MIN_SHARE = 0.10
# page hashes remembered (8 bytes each + the entry: ~100 B): ~64k pages = 16 M characters
# of distinct prompt text, ~6 MB
MAX_ENTRIES = 1 << 16


class PrefixAffinityRouter(RequestRouter):
    """Routes a request to the replica that last served the longest run of its prompt's
    pages, within bounded load; otherwise by power of two choices.

    Configured through ``RequestRouterConfig.request_router_kwargs`` (see
    :meth:`initialize_state`).
    """

    def initialize_state(self, slots: int = 4, max_imbalance: int | None = None,
                         max_entries: int = MAX_ENTRIES, **_: Any) -> None:
        """Args:
            slots: requests a replica decodes together (its ``N_PARALLEL``): the affine
                replica is preferred only while it runs fewer.
            max_imbalance: how many more requests than the least-loaded replica the affine
                replica may run (default: half its slots, at least 1).
            max_entries: page hashes remembered (least recently used are forgotten).
        """
        self._slots = max(1, int(slots))
        self._max_imbalance = (max(1, self._slots // 2) if max_imbalance is None
                               else max(0, int(max_imbalance)))
        self._max_entries = max(1, int(max_entries))
        self._owner: OrderedDict[bytes, ReplicaID] = OrderedDict()
        self._pages: Counter[ReplicaID] = Counter()  # pages each replica served last

    # -- the policy ----------------------------------------------------------

    @staticmethod
    def _keys(pending_request: PendingRequest | None) -> Sequence[bytes]:
        if pending_request is None:
            return ()
        keys = pending_request.kwargs.get(AFFINITY_KWARG)
        return keys if isinstance(keys, (tuple, list)) else ()

    def _affine_replica(self, keys: Sequence[bytes],
                        running: dict[ReplicaID, RunningReplica]) -> RunningReplica | None:
        """The running replica that last served the longest run of ``keys``, if that run is
        long enough to be worth it."""
        need = max(1, int(len(keys) * MIN_SHARE + 0.999999))
        for n in range(len(keys), need - 1, -1):
            rid = self._owner.get(keys[n - 1])
            if rid is not None and rid in running:
                return running[rid]
        return None

    async def _queue_lens(self, replicas: Sequence[RunningReplica]) -> dict[ReplicaID, int]:
        """Ray's queue length of each replica: cached, else probed (like the default policy)."""
        lens: dict[ReplicaID, int] = {}
        unknown = []
        for r in replicas:
            q = self.replica_queue_len_cache.get(r.replica_id)
            if q is None:
                unknown.append(r)
            else:
                lens[r.replica_id] = q
        if unknown:
            for r, q in await self._probe_queue_lens(unknown, 0):
                if q is not None:
                    lens[r.replica_id] = q
        return lens

    async def _two_choices(self, candidates: list[RunningReplica],
                           lens: dict[ReplicaID, int] | None = None) -> list[list[RunningReplica]]:
        """Power of two choices, the shorter queue first and, on a tie, the replica holding
        fewer pages (Ray then sends to the first with room)."""
        two = random.sample(candidates, 2) if len(candidates) > 2 else list(candidates)
        if len(two) < 2:
            return [two]
        lens = lens if lens is not None else await self._queue_lens(two)
        two.sort(key=lambda r: (lens.get(r.replica_id, 0), self._pages[r.replica_id]))
        return [[two[0]], [two[1]]]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        """Ranks of replicas to try in order: the affine replica alone when it qualifies,
        then two random ones (Ray sends the request to the first rank with room)."""
        if not candidate_replicas:
            return []
        keys = self._keys(pending_request)
        affine = (self._affine_replica(keys, {r.replica_id: r for r in candidate_replicas})
                  if keys else None)
        if affine is None:
            return await self._two_choices(candidate_replicas)
        lens = await self._queue_lens(candidate_replicas)
        mine = lens.get(affine.replica_id)
        least = min(lens.values(), default=0)
        if mine is not None and (mine >= self._slots or mine - least > self._max_imbalance):
            return await self._two_choices(candidate_replicas, lens)
        others = [r for r in candidate_replicas if r is not affine]
        return [[affine], *(await self._two_choices(others, lens) if others else [])]

    # -- learning ------------------------------------------------------------

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        """The replica now holds this prompt's pages (or will, once it evaluates them)."""
        for key in self._keys(pending_request):
            previous = self._owner.get(key)
            if previous != replica_id:
                self._pages[replica_id] += 1
                if previous is not None:
                    self._pages[previous] -= 1
            self._owner[key] = replica_id
            self._owner.move_to_end(key)
        while len(self._owner) > self._max_entries:
            _, rid = self._owner.popitem(last=False)
            self._pages[rid] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        # its pages are gone with it; forget them so they route by load again
        for key in [k for k, rid in self._owner.items() if rid == replica_id]:
            del self._owner[key]
        self._pages.pop(replica_id, None)
