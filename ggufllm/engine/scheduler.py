"""The scheduler: the one thread that owns a llama.cpp context and drives its stepper.

Requests (a sync stream, an async stream, a blocking answer) are queued in the
:class:`~.stepper.Stepper` and handed back their chunks through a ``sink`` callable;
no caller touches the context and no lock is held while a caller waits. The thread
runs the stepper's steps, runs the commands other threads hand it between two steps
(``call``: save the cache, clear it), sleeps when there is nothing to do, and on a
close or an unexpected error ends every request and frees the context. The
scheduling policy itself is the stepper's (see :mod:`.stepper`).
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import EngineFailedError, ServiceClosedError
from .native import Batch, NativeContext
from .request import ProgressCallback, Request, RequestState, Sink
from .sampling import build_sampler
from .slots import SlotTable
from .stepper import Stepper

__all__ = ["Request", "RequestState", "Scheduler", "Sink", "ProgressCallback"]

logger = logging.getLogger(__name__)
# schedulers still running at interpreter exit are stopped (and free their context)
# before Python finalizes, not killed in the middle of a llama_decode
_LIVE: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for scheduler in list(_LIVE):
        scheduler.close()


class Scheduler:
    """Runs the stepper of one context in its own thread.

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
        self._batch = Batch(max(ctx.n_batch, len(slots.slots)))
        self.stepper = Stepper(ctx, slots, self._batch, n_ctx_seq=n_ctx_seq, max_queue=max_queue,
                               make_sampler=lambda r: build_sampler(r.cfg, ctx, n_vocab))
        self._on_exit = on_exit
        self._on_failure = on_failure
        self.failure: EngineFailedError | None = None  # set once, by the thread, as it stops
        self._lock = threading.Lock()  # guards _commands and _stopping (never held long)
        self._wake = threading.Event()
        self._commands: deque[tuple[Callable[[], Any], threading.Event, list[Any]]] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ggufllm-scheduler", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    @property
    def n_ctx_seq(self) -> int:
        return self.stepper.n_ctx_seq

    @property
    def max_queue(self) -> int:
        return self.stepper.max_queue

    @property
    def tokens_evaluated(self) -> int:
        return self.stepper.tokens_evaluated

    # -- caller side (any thread) ----------------------------------------------

    def submit(self, request: Request) -> None:
        """Queues ``request``.

        Raises:
            ServerBusyError: the wait queue is full.
            ServiceClosedError: the scheduler is stopping.
        """
        with self._lock:  # held across the insert: a close cannot slip between
            if self._stopping:
                raise self.failure or ServiceClosedError("the model was closed")
            self.stepper.insert(request)
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
        return {"running": len(self.stepper.active), "waiting": self.stepper.n_waiting(),
                "max_queue": self.max_queue}

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
        if not self.stepper.step():
            self._wake.wait()
            self._wake.clear()
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
            commands, self._commands = list(self._commands), deque()
        self.stepper.end_all(self.failure)
        for _fn, done, box in commands:
            box.append(self.failure or ServiceClosedError("the model was closed"))
            done.set()
        self._batch.close()
        try:
            self._on_exit()
        except Exception:
            logger.exception("freeing the context failed")
