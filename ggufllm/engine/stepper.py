"""The stepper: the scheduling policy of one context, with no thread of its own.

``insert(request)`` queues a request, ``step()`` runs one step of every request it
holds, ``cancel(request)`` ends one at the next step; :class:`~.scheduler.Scheduler`
is the thin thread that drives it. The stepper talks to llama.cpp only through the
small interfaces below (:class:`StepContext`, :class:`StepBatch`, :class:`StepSampler`),
so its policy runs against a fake context in the unit tests
(``tests/test_stepper.py``) as well as against the real engine. One step:

1. end cancelled requests (waiting ones before their prefill, without a slot);
2. admit waiting requests, oldest first, while the pool holds every admitted request
   at its full budget (:func:`~.fit.cells_needed`) and a slot is free
   (:class:`~.slots.SlotTable` picks the one with the longest cached prefix);
3. one ``llama_decode`` over whole prompt pages of the prefilling requests (oldest
   first, up to ``n_batch`` tokens beside the decode rows) and one token of every
   generating request, as llama-server batches them; sample each request at its row
   and hand its chunks to its sink.

A request alone is evaluated as a cold run would be: its prompt in pages of 64 tokens
from multiples of 64, one ``llama_decode`` per page, then its decode steps (see
:mod:`.slots`: a token is then always evaluated in the same batch, so an answer
through the cache equals the cold one). Requests that run together share batches: a
row's logits move with the shape of its batch, by an amount that depends on the CPU's
kernels (``benchmarks/batch_invariance.py``), so a greedy answer computed beside
others can leave the sequential one at a near tie (``tests/near_tie.py``). Sharing
the batch is what makes eight requests arriving at once start together (one call,
not eight) and spares a pass over the weights for every prompt that arrives while
others generate.

A request moves through :class:`~.request.RequestState`: ``WAITING`` (queued, no slot)
→ ``PREFILLING`` (a slot, its prompt going into the cache) → ``GENERATING`` (its last
sampled token waits to be evaluated) → ``FINISHED`` (its sink got its last chunks or
an error, its slot is free).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..chunks import Chunk, FinishReason, Timings
from ..errors import DecodeFailedError, ServerBusyError
from .fit import cells_needed
from .request import Request, RequestState
from .slots import PAGE, Slot, SlotTable

__all__ = ["Stepper", "StepContext", "StepBatch", "StepSampler", "SamplerFactory"]

logger = logging.getLogger(__name__)

WAITING, PREFILLING = RequestState.WAITING, RequestState.PREFILLING
GENERATING, FINISHED = RequestState.GENERATING, RequestState.FINISHED


class StepContext(Protocol):
    """What the stepper and its slot table use of a llama.cpp context."""

    @property
    def n_ctx(self) -> int: ...
    @property
    def n_batch(self) -> int: ...
    def decode(self, batch: Any) -> int: ...
    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool: ...
    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None: ...
    def seq_pos_min(self, seq: int) -> int: ...
    def seq_pos_max(self, seq: int) -> int: ...


class StepBatch(Protocol):
    """A batch the stepper refills for every ``decode``."""

    n: int
    def clear(self) -> None: ...
    def add(self, token: int, pos: int, seq: int, logits: bool) -> int: ...
    def close(self) -> None: ...


class StepSampler(Protocol):
    """One request's sampler (:func:`~.sampling.build_sampler` makes the real one)."""

    def accept(self, tokens: Sequence[int]) -> None: ...
    def sample(self, ctx: Any, index: int) -> int: ...
    def close(self) -> None: ...


SamplerFactory = Callable[[Request], StepSampler]


class Stepper:
    """Admits, prefills, decodes and ends the requests of one context, a step at a time.

    ``insert`` and ``cancel`` may be called from any thread; ``step`` and ``end_all`` only
    from the one thread that owns the context.

    Args:
        ctx: the context.
        slots: the slot table over ``ctx``'s sequences.
        batch: the batch to refill at each decode (capacity ``max(n_batch, n_slots)``).
        n_ctx_seq: most tokens one request may hold (prompt + generated).
        max_queue: most requests waiting for a slot; one more is refused.
        make_sampler: builds a request's sampler when it is admitted.
    """

    def __init__(self, ctx: StepContext, slots: SlotTable, batch: StepBatch, *,
                 n_ctx_seq: int, max_queue: int, make_sampler: SamplerFactory) -> None:
        self._ctx = ctx
        self.slots = slots
        self._batch = batch
        self.n_ctx_seq = n_ctx_seq
        self.max_queue = max_queue
        self._make_sampler = make_sampler
        # prompt pages per step: up to n_batch tokens, one llama_decode per page
        self._page = min(PAGE, ctx.n_batch)
        self._pages_per_step = max(1, ctx.n_batch // self._page)
        self._lock = threading.Lock()  # guards _waiting (insert comes from any thread)
        self._waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.tokens_evaluated = 0

    # -- any thread ------------------------------------------------------------

    def insert(self, request: Request) -> None:
        """Queues ``request`` (``WAITING``).

        Raises:
            ServerBusyError: ``max_queue`` requests already wait beyond the free slots.
        """
        with self._lock:
            pending = sum(1 for r in self._waiting if not r.cancel.is_set())
            free = sum(1 for s in self.slots.slots if not s.busy)
            # requests that a free slot will take at the next step do not count as queued
            if pending - free >= self.max_queue:
                raise ServerBusyError(self.max_queue)
            request.state = WAITING
            self._waiting.append(request)

    @staticmethod
    def cancel(request: Request) -> None:
        """Ends ``request`` as ``cancelled`` at the next step (also what ``request.cancel`` does)."""
        request.cancel.set()

    def n_waiting(self) -> int:
        """Queued requests not cancelled."""
        with self._lock:
            return sum(1 for r in self._waiting if not r.cancel.is_set())

    # -- the owning thread -----------------------------------------------------

    def step(self) -> bool:
        """Ends cancelled requests, admits waiting ones and runs one step of the rest.

        Returns:
            False when it held nothing to run (the caller may wait for a new request).
        """
        self._drop_cancelled()
        self._admit()
        if not self.active:
            return False
        prefilling = [r for r in self.active if r.state is PREFILLING]
        generating = [r for r in self.active if r.state is GENERATING]
        if prefilling and (generating or len(prefilling) > 1):
            if self._shared_step(prefilling, generating):
                return True
        if prefilling:  # a request alone: its prompt in pages of their own, as cold
            self._prefill_chunk(prefilling[0])
            generating = [r for r in self.active if r.state is GENERATING]
        if generating:
            self._batch.clear()
            self._run_step([], generating)
        return True

    def end_all(self, failure: BaseException | None) -> None:
        """Ends every request: as ``cancelled`` (``failure`` None: the engine closed), else with
        ``failure`` delivered (never a cut answer passed off as whole)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for r in self.active + waiting:
            if failure is None:
                self._finish(r, "cancelled", release=False)
            else:
                self._leave(r, release=False)
                self._deliver(r, failure)
        self.active = []

    # -- admission -------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.active if r.cancel.is_set()]:
            self._finish(r, "cancelled")
        with self._lock:
            gone = [r for r in self._waiting if r.cancel.is_set()]
            if gone:
                self._waiting = deque(r for r in self._waiting if not r.cancel.is_set())
        for r in gone:  # never started: no prefill, no slot
            self._finish(r, "cancelled", release=False)

    def _need(self, r: Request) -> int:
        return cells_needed(len(r.prompt), r.cfg.max_tokens, self.n_ctx_seq)

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                r = self._waiting[0]  # only the owning thread removes from the queue
            # the pool must hold every admitted request at its full budget
            reserved = sum(self._need(a) for a in self.active)
            if self.active and reserved + self._need(r) > self._ctx.n_ctx:
                return
            placement = self.slots.place(r.prompt)
            if placement is None:
                return
            with self._lock:
                self._waiting.popleft()
            try:
                self._start(r, placement.slot, placement.n_reuse)
            except Exception as exc:
                self.slots.release(placement.slot)
                r.slot = None
                self._fail(r, exc)

    def _start(self, r: Request, slot: Slot, n_reuse: int) -> None:
        r.slot = slot
        r.n_done = r.n_cached = n_reuse
        r.t_start = time.perf_counter()
        r.sampler = self._make_sampler(r)  # with r's grammar, if any
        r.sampler.accept(r.prompt)
        r.state = PREFILLING
        self.active.append(r)

    # -- prompt evaluation -----------------------------------------------------

    def _prefill_chunk(self, r: Request) -> None:
        """Evaluates up to ``n_batch`` prompt tokens of ``r``, one page per llama_decode."""
        for _ in range(self._pages_per_step):
            # a request may finish at its first token (max_tokens=1, a stop) or fail
            if not self._prefill_page(r) or r.state is not PREFILLING:
                return

    def _prefill_page(self, r: Request) -> bool:
        self._batch.clear()
        # pages start at multiples of PAGE: a token is always evaluated in the same batch
        end = self._add_prompt(r, self._next_page_end(r.n_done, len(r.prompt)))
        if not self._decode([r]):
            return False
        self._stored_prompt(r, end, self._batch.n - 1)
        return True

    def _next_page_end(self, start: int, n_prompt: int) -> int:
        if not self.slots.exact and n_prompt - start <= self._page:
            # KV_REUSE=fast: what is left of a prompt reused up to an unaligned position (a
            # follow-up's question) goes in one llama_decode, not split at a page boundary
            return n_prompt
        return min(n_prompt, (start // self._page + 1) * self._page)

    def _add_prompt(self, r: Request, end: int) -> int:
        """Adds ``r``'s prompt tokens from ``r.n_done`` to ``end`` to the batch."""
        seq, last = _slot(r).seq, len(r.prompt) - 1
        for pos in range(r.n_done, end):
            self._batch.add(r.prompt[pos], pos, seq, pos == last)
        return end

    def _stored_prompt(self, r: Request, end: int, row: int) -> None:
        """Books ``r``'s prompt tokens up to ``end`` as stored; samples at ``row`` when
        the prompt is complete."""
        slot, page = _slot(r), self._page
        slot.tokens.extend(r.prompt[r.n_done:end])
        if slot.n_exact == r.n_done and r.n_done % page == 0 and end % page == 0:
            slot.n_exact = end  # whole pages, evaluated on an exact prefix
        self.tokens_evaluated += end - r.n_done
        r.n_done = end
        self._report_progress(r)
        if end == len(r.prompt):
            slot.n_prompt = end  # its answer follows (the KV store checkpoints before it)
            slot.n_shared = r.n_shared  # ...and where another question would begin
            r.t_first = time.perf_counter()
            self._sample(r, row)

    def _shared_step(self, prefilling: list[Request], generating: list[Request]) -> bool:
        """One ``llama_decode`` over whole prompt pages of the waiting prompts (oldest
        first, up to ``n_batch`` tokens in all) and one token of every generating
        request; False when no page fits beside the decode rows (the caller then
        evaluates a page on its own)."""
        self._batch.clear()
        budget = self._ctx.n_batch - len(generating)
        spans: list[tuple[Request, int, int]] = []
        for r in prefilling:
            end = r.n_done
            while end < len(r.prompt):
                nxt = self._next_page_end(end, len(r.prompt))
                if nxt - end > budget:
                    break
                budget -= nxt - end
                end = nxt
            if end == r.n_done:
                break  # prompts go in arrival order
            self._add_prompt(r, end)
            spans.append((r, end, self._batch.n - 1))
        if not spans:
            return False
        self._run_step(spans, generating)
        return True

    def _report_progress(self, r: Request) -> None:
        if r.on_prompt_progress is None:
            return
        try:
            r.on_prompt_progress(r.n_done, len(r.prompt))
        except Exception:
            logger.exception("on_prompt_progress raised; ignored")

    # -- decoding --------------------------------------------------------------

    def _run_step(self, spans: list[tuple[Request, int, int]], generating: list[Request]) -> None:
        """Adds one token of every generating request after the prompt ``spans`` already in
        the batch (request, prompt end, row of its last token), decodes, books and samples."""
        rows = [self._batch.add(r.next_token, len(_slot(r).tokens), _slot(r).seq, True)
                for r in generating]
        if not self._decode([r for r, _, _ in spans] + generating):
            return
        for r, end, row in spans:
            self._stored_prompt(r, end, row)
        for r, row in zip(generating, rows, strict=True):
            _slot(r).tokens.append(r.next_token)
            self._sample(r, row)

    def _decode(self, in_batch: list[Request]) -> bool:
        """llama_decode, evicting idle slots while the pool is full.

        On failure the requests in the batch fail with :class:`DecodeFailedError`, and
        whatever cells the failed call left past each one's ``Slot.tokens`` are removed
        (a later prompt in that slot starts from what ``Slot.tokens`` says). Out of KV
        cells with several requests in the batch, only the newest fails; the next step
        builds the batch again without it.
        """
        while True:
            rc = self._ctx.decode(self._batch)
            if rc == 0:
                return True
            if rc == 1 and self.slots.evict_one():
                continue
            err = DecodeFailedError(rc)
            victims = in_batch
            if rc == 1 and len(in_batch) > 1:
                victims = [max(in_batch, key=lambda r: r.t_start)]
            for r in in_batch:
                self.slots.drop_past(_slot(r))
            for r in victims:
                self._fail(r, err)
            return False

    def _sample(self, r: Request, index: int) -> None:
        """Samples ``r``'s next token at batch row ``index`` and hands its chunks over."""
        try:
            assert r.sampler is not None
            token = r.sampler.sample(self._ctx, index)
            r.n_gen += 1
            chunks, done = r.reader.feed(token)
            # the next token would go at position len(tokens): past the window, stop
            if done is None and (r.n_gen >= r.cfg.max_tokens
                                 or len(_slot(r).tokens) >= self.n_ctx_seq):
                done = "length"
            if done is not None:
                self._finish(r, done, chunks)
                return
            r.next_token = token
            r.state = GENERATING
            r.sink(chunks)
        except Exception as exc:
            self._fail(r, exc)

    # -- leaving ---------------------------------------------------------------

    def _finish(self, r: Request, finish: FinishReason, chunks: list[Chunk] | None = None,
                release: bool = True) -> None:
        """Hands the last chunks (with the finish reason and timings) and frees the slot."""
        now = time.perf_counter()
        started = r.state in (PREFILLING, GENERATING)
        # t_first is set when the prompt is all in the cache (its first token is sampled then)
        t_first = r.t_first if started and r.n_done == len(r.prompt) else now
        timings = Timings(len(r.prompt), r.n_cached, r.n_gen,
                          (t_first - r.t_start) if started else 0.0, now - t_first)
        try:
            out = list(chunks or []) + r.reader.flush(finish)
            out.append(Chunk("", "final", (), finish, timings))
        except Exception as exc:
            self._leave(r, release)
            self._deliver(r, exc)
            return
        self._leave(r, release)
        self._deliver(r, out)

    def _fail(self, r: Request, exc: BaseException) -> None:
        self._leave(r, True)
        self._deliver(r, exc)

    def _leave(self, r: Request, release: bool) -> None:
        if r in self.active:
            self.active.remove(r)
        if r.sampler is not None:
            r.sampler.close()
            r.sampler = None
        if r.slot is not None and release:
            self.slots.release(r.slot)
        r.slot = None
        r.state = FINISHED

    @staticmethod
    def _deliver(r: Request, item: Any) -> None:
        try:
            r.sink(item)
        except Exception:
            logger.exception("a request's sink failed")


def _slot(r: Request) -> Slot:
    """The slot of an admitted request (``PREFILLING`` or ``GENERATING``)."""
    assert r.slot is not None, r.state
    return r.slot
