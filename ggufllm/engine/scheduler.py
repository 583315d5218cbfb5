"""The scheduler: one thread that owns the llama.cpp context and decodes every request.

Requests (a sync stream, an async stream, a blocking answer) are submitted to a
bounded wait queue and handed back their chunks through a ``sink`` callable; no
caller touches the context and no lock is held while a caller waits. Each step:

1. drop cancelled requests (waiting ones before their prefill);
2. admit waiting requests into free slots (:class:`~.slots.SlotTable` picks the
   slot with the longest cached prefix);
3. one ``llama_decode`` over whole prompt pages of the new requests (oldest first,
   up to ``n_batch`` tokens with the decode rows) and one token of every
   generating request, as llama-server batches them; sample each request at its
   row and hand the chunks to its sink.

A request alone is evaluated as a cold run would be: its prompt in pages of 64
tokens from multiples of 64, one ``llama_decode`` per page, then its decode
steps (see :mod:`.slots`: a token is then always evaluated in the same batch, so
an answer through the cache equals the cold one). Requests that run together
share batches: a row's logits move with the shape of its batch, by an amount
that depends on the CPU's kernels (``benchmarks/batch_invariance.py``), so a greedy
answer computed beside others can leave the sequential one at a near tie
(``tests/near_tie.py``). Sharing the batch is what makes eight requests
arriving at once start together (one call, not eight) and spares a pass over
the weights for every prompt that arrives while others generate.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from ..chunks import Chunk, FinishReason, Timings
from ..errors import DecodeFailedError, EngineFailedError, ServerBusyError, ServiceClosedError
from .native import Batch, NativeContext
from .request import ProgressCallback, Request, Sink
from .sampling import build_sampler
from .slots import PAGE, Slot, SlotTable

__all__ = ["Request", "Scheduler", "Sink", "ProgressCallback"]

logger = logging.getLogger(__name__)
# schedulers still running at interpreter exit are stopped (and free their context)
# before Python finalizes, not killed in the middle of a llama_decode
_LIVE: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for scheduler in list(_LIVE):
        scheduler.close()

class Scheduler:
    """Runs the decode loop of one context in its own thread.

    Args:
        ctx: the context (the scheduler is its only user after creation).
        slots: the slot table over ``ctx``'s sequences.
        n_ctx_seq: most tokens one request may hold (prompt + generated).
        max_queue: most requests waiting for a slot; one more is refused.
        n_vocab: the vocabulary size (the repetition penalty needs it).
        on_exit: called by the thread once it stopped touching ``ctx`` (frees it).
        on_failure: called by the thread, after ``on_exit``, when it stopped on an
            unexpected error (every request it held ended with :class:`EngineFailedError`).
    """

    def __init__(self, ctx: NativeContext, slots: SlotTable, *, n_ctx_seq: int,
                 max_queue: int, n_vocab: int, on_exit: Callable[[], None],
                 on_failure: Callable[[EngineFailedError], None] | None = None) -> None:
        self._ctx = ctx
        self.slots = slots
        self.n_ctx_seq = n_ctx_seq
        self.max_queue = max_queue
        self._n_vocab = n_vocab
        self._batch = Batch(max(ctx.n_batch, len(slots.slots)))
        # prompt pages per step: up to n_batch tokens, one llama_decode per page
        self._page = min(PAGE, ctx.n_batch)
        self._pages_per_step = max(1, ctx.n_batch // self._page)
        self._on_exit = on_exit
        self._on_failure = on_failure
        self.failure: EngineFailedError | None = None  # set once, by the thread, as it stops
        self._lock = threading.Lock()  # guards _waiting, _commands, _stopping (never held long)
        self._wake = threading.Event()
        self._waiting: deque[Request] = deque()
        self._commands: deque[tuple[Callable[[], Any], threading.Event, list[Any]]] = deque()
        self._active: list[Request] = []
        self._stopping = False
        self.tokens_evaluated = 0
        self._thread = threading.Thread(target=self._run, name="ggufllm-scheduler", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # -- caller side (any thread) ----------------------------------------------

    def submit(self, request: Request) -> None:
        """Queues ``request``.

        Raises:
            ServerBusyError: the wait queue is full.
            ServiceClosedError: the scheduler is stopping.
        """
        with self._lock:
            if self._stopping:
                raise self.failure or ServiceClosedError("the model was closed")
            pending = sum(1 for r in self._waiting if not r.cancel.is_set())
            free = sum(1 for s in self.slots.slots if not s.busy)
            # requests that a free slot will take at the next step do not count as queued
            if pending - free >= self.max_queue:
                raise ServerBusyError(self.max_queue)
            self._waiting.append(request)
        self._wake.set()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` in the scheduler thread between two steps; returns its result."""
        if threading.current_thread() is self._thread:
            return fn()
        done, box = threading.Event(), []
        with self._lock:
            if self._stopping:
                raise ServiceClosedError("the model was closed")
            self._commands.append((fn, done, box))
        self._wake.set()
        done.wait()
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None

    def close(self) -> None:
        """Cancels every request, stops the thread and waits until it let go of the context."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def counts(self) -> dict[str, int]:
        """Running and waiting requests, and the queue bound."""
        with self._lock:
            waiting = sum(1 for r in self._waiting if not r.cancel.is_set())
        return {"running": len(self._active), "waiting": waiting, "max_queue": self.max_queue}

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._loop_once():
                pass
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            logger.exception("the scheduler stopped on an error")
            self.failure = EngineFailedError(f"{type(exc).__name__}: {exc}")
        finally:
            self._shutdown()
        if self.failure is not None and self._on_failure is not None:
            try:
                self._on_failure(self.failure)
            except Exception:
                logger.exception("the engine-failure handler failed")

    def _loop_once(self) -> bool:
        self._run_commands()
        with self._lock:
            if self._stopping:
                return False
        self._drop_cancelled()
        self._admit()
        if not self._active:
            self._wake.wait()
            self._wake.clear()
            return True
        prefilling = [r for r in self._active if not r.generating]
        generating = [r for r in self._active if r.generating]
        if prefilling and (generating or len(prefilling) > 1):
            if self._shared_step(prefilling, generating):
                return True
        if prefilling:  # a request alone: its prompt in pages of their own, as cold
            self._prefill_chunk(prefilling[0])
            generating = [r for r in self._active if r.generating]
        if generating:
            self._decode_step(generating)
        return True

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                fn, done, box = self._commands.popleft()
            try:
                box.append(fn())
            except BaseException as exc:  # raised again in the caller's thread
                box.append(exc)
            done.set()

    def _shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            commands, self._commands = list(self._commands), deque()
        for r in self._active + waiting:
            if self.failure is None:  # closed: requests end as cancelled
                self._finish(r, "cancelled", release=False)
            else:  # failed: an error, never a cut answer passed off as whole
                self._leave(r, False)
                self._deliver(r, self.failure)
        self._active = []
        for _fn, done, box in commands:
            box.append(self.failure or ServiceClosedError("the model was closed"))
            done.set()
        self._batch.close()
        try:
            self._on_exit()
        except Exception:
            logger.exception("freeing the context failed")

    # -- admission -------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._active if r.cancel.is_set()]:
            self._finish(r, "cancelled")
        with self._lock:
            if any(r.cancel.is_set() for r in self._waiting):
                gone = [r for r in self._waiting if r.cancel.is_set()]
                self._waiting = deque(r for r in self._waiting if not r.cancel.is_set())
            else:
                gone = []
        for r in gone:  # never started: no prefill, no slot
            self._finish(r, "cancelled", release=False)

    def _reserved(self) -> int:
        return sum(self._need(r) for r in self._active)

    def _need(self, r: Request) -> int:
        return min(len(r.prompt) + r.cfg.max_tokens, self.n_ctx_seq)

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                r = self._waiting[0]  # only this thread removes from the queue
            # the pool must hold every admitted request at its full budget
            if self._active and self._reserved() + self._need(r) > self._ctx.n_ctx:
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
                self._fail(r, exc)

    def _start(self, r: Request, slot: Slot, n_reuse: int) -> None:
        r.slot = slot
        r.n_done = r.n_cached = n_reuse
        r.t_start = time.perf_counter()
        r.sampler = build_sampler(r.cfg, self._ctx, self._n_vocab)  # with r's grammar, if any
        r.sampler.accept(r.prompt)
        self._active.append(r)

    # -- prompt evaluation -----------------------------------------------------

    def _prefill_chunk(self, r: Request) -> None:
        """Evaluates up to ``n_batch`` prompt tokens of ``r``, one page per llama_decode."""
        for _ in range(self._pages_per_step):
            # r.slot is None once r finished at its first token (max_tokens=1, a stop)
            if not self._prefill_page(r) or r.generating or r.slot is None:
                return

    def _prefill_page(self, r: Request) -> bool:
        batch = self._batch
        batch.clear()
        # pages start at multiples of PAGE: a token is always evaluated in the same batch
        end = self._add_prompt(r, self._next_page_end(r.n_done, len(r.prompt)))
        if not self._decode(batch, [r]):
            return False
        self._stored_prompt(r, end, batch.n - 1)
        return True

    def _next_page_end(self, start: int, n_prompt: int) -> int:
        return min(n_prompt, (start // self._page + 1) * self._page)

    def _add_prompt(self, r: Request, end: int) -> int:
        """Adds ``r``'s prompt tokens from ``r.n_done`` to ``end`` to the batch."""
        seq, last = r.slot.seq, len(r.prompt) - 1  # type: ignore[union-attr]
        for pos in range(r.n_done, end):
            self._batch.add(r.prompt[pos], pos, seq, pos == last)
        return end

    def _stored_prompt(self, r: Request, end: int, row: int) -> None:
        """Books ``r``'s prompt tokens up to ``end`` as stored; samples at ``row`` when
        the prompt is complete."""
        slot, page = r.slot, self._page
        assert slot is not None
        slot.tokens.extend(r.prompt[r.n_done:end])
        if slot.n_exact == r.n_done and r.n_done % page == 0 and end % page == 0:
            slot.n_exact = end  # whole pages, evaluated on an exact prefix
        self.tokens_evaluated += end - r.n_done
        r.n_done = end
        self._report_progress(r)
        if end == len(r.prompt):
            slot.n_prompt = end  # its answer follows (the KV store checkpoints before it)
            r.t_first = time.perf_counter()
            self._sample(r, row)

    def _shared_step(self, prefilling: list[Request], generating: list[Request]) -> bool:
        """One ``llama_decode`` over whole prompt pages of the waiting prompts (oldest
        first, up to ``n_batch`` tokens in all) and one token of every generating
        request, as llama-server batches them; False when no page fits beside the
        decode rows (the caller then evaluates a page on its own)."""
        batch = self._batch
        batch.clear()
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
            spans.append((r, end, batch.n - 1))
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

    def _decode_step(self, generating: list[Request]) -> None:
        self._batch.clear()
        self._run_step([], generating)

    def _run_step(self, spans: list[tuple[Request, int, int]], generating: list[Request]) -> None:
        """Adds one token of every generating request after the prompt ``spans`` already in
        the batch (request, prompt end, row of its last token), decodes, books and samples."""
        batch = self._batch
        rows = [batch.add(r.next_token, len(r.slot.tokens), r.slot.seq, True)  # type: ignore[union-attr]
                for r in generating]
        if not self._decode(batch, [r for r, _, _ in spans] + generating):
            return
        for r, end, row in spans:
            self._stored_prompt(r, end, row)
        for r, row in zip(generating, rows, strict=True):
            r.slot.tokens.append(r.next_token)  # type: ignore[union-attr]
            self._sample(r, row)

    def _decode(self, batch: Batch, rows_of: list[Request]) -> bool:
        """llama_decode, evicting idle slots while the pool is full.

        On failure the requests in the batch fail with :class:`DecodeFailedError`, and
        whatever cells the failed call left past each one's ``Slot.tokens`` are removed
        (a later prompt in that slot starts from what ``Slot.tokens`` says). Out of KV
        cells with several requests in the batch, only the newest fails; the caller
        builds the batch again without it (see :meth:`_run_step`).
        """
        while True:
            rc = self._ctx.decode(batch)
            if rc == 0:
                return True
            if rc == 1 and self.slots.evict_one():
                continue
            err = DecodeFailedError(rc)
            victims = rows_of
            if rc == 1 and len(rows_of) > 1:
                victims = [max(rows_of, key=lambda r: r.t_start)]
            for r in rows_of:
                self._drop_stale(r)
            for r in victims:
                self._fail(r, err)
            return False

    def _drop_stale(self, r: Request) -> None:
        """Removes the cells a failed decode may have stored past ``r``'s booked tokens."""
        if r.slot is not None:
            self.slots.drop_past(r.slot)

    def _sample(self, r: Request, index: int) -> None:
        """Samples ``r``'s next token at batch row ``index`` and hands its chunks over."""
        try:
            token = r.sampler.sample(self._ctx, index)  # type: ignore[union-attr]
            r.n_gen += 1
            chunks, done = r.reader.feed(token)
            if done is None:
                # the next token would go at position len(tokens): past the window, stop
                if r.n_gen >= r.cfg.max_tokens or len(r.slot.tokens) >= self.n_ctx_seq:  # type: ignore[union-attr]
                    done = "length"
            if done is not None:
                self._finish(r, done, chunks)
                return
            r.next_token = token
            r.sink(chunks)
        except Exception as exc:
            self._fail(r, exc)

    # -- leaving ---------------------------------------------------------------

    def _finish(self, r: Request, finish: FinishReason, chunks: list[Chunk] | None = None,
                release: bool = True) -> None:
        """Hands the last chunks (with the finish reason and timings) and frees the slot."""
        now = time.perf_counter()
        t_first = r.t_first or now
        timings = Timings(len(r.prompt), r.n_cached, r.n_gen,
                          (t_first - r.t_start) if r.t_start else 0.0, now - t_first)
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
        if r in self._active:
            self._active.remove(r)
        if r.sampler is not None:
            r.sampler.close()
            r.sampler = None
        if r.slot is not None and release:
            self.slots.release(r.slot)
        r.slot = None
        r.next_token = -1

    @staticmethod
    def _deliver(r: Request, item: Any) -> None:
        try:
            r.sink(item)
        except Exception:
            logger.exception("a request's sink failed")
