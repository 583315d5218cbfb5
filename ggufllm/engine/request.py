"""A request to the scheduler: its prompt, sampling, reader, sink and cancel flag."""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..config import GenerationConfig
from .native import Sampler
from .output import OutputReader
from .slots import Slot

__all__ = ["Request", "RequestState", "Sink", "ProgressCallback"]

# A sink receives a list of chunks (the last list ends with the chunk carrying the
# finish reason) or an exception; it is called from the scheduler thread.
Sink = Callable[[Any], None]
ProgressCallback = Callable[[int, int], None]


class RequestState(enum.Enum):
    """Where a request is (llama-server's ``slot_state``, per request)."""

    WAITING = "waiting"  # queued, no slot yet
    PREFILLING = "prefilling"  # in a slot, its prompt going into the cache
    GENERATING = "generating"  # its last sampled token (``next_token``) waits to be evaluated
    FINISHED = "finished"  # its sink got its last chunks or an error; no slot


class Request:
    """One generation: its prompt, sampling, reader, sink and cancel flag.

    Args:
        prompt: the prompt tokens.
        cfg: generation parameters (validated; the budget fits the window).
        reader: turns sampled tokens into chunks.
        sink: where chunk lists (or an exception) go.
        on_prompt_progress: called with (prompt tokens in the cache, prompt length)
            after each prompt chunk; exceptions are logged and ignored.
        cancel: the flag that cancels it (None: a new one).
        n_shared: the prompt's leading tokens that other questions over the same context
            share (:attr:`Prompt.n_shared`; 0: not known).
    """

    __slots__ = ("prompt", "cfg", "reader", "sink", "on_prompt_progress", "cancel", "n_shared",
                 "slot", "sampler", "state", "n_done", "n_cached", "n_gen", "next_token",
                 "t_start", "t_first")

    def __init__(self, prompt: Sequence[int], cfg: GenerationConfig, reader: OutputReader,
                 sink: Sink, on_prompt_progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None, *, n_shared: int = 0) -> None:
        self.prompt = list(prompt)
        self.n_shared = n_shared
        self.cfg = cfg
        self.reader = reader
        self.sink = sink
        self.on_prompt_progress = on_prompt_progress
        self.cancel = cancel if cancel is not None else threading.Event()
        self.state = RequestState.WAITING
        self.slot: Slot | None = None  # while PREFILLING or GENERATING
        self.sampler: Sampler | None = None  # while PREFILLING or GENERATING
        self.n_done = self.n_cached = self.n_gen = 0
        self.next_token = 0  # while GENERATING: sampled, shown, not yet in the cache
        self.t_start = 0.0  # set when it leaves WAITING
        self.t_first = 0.0  # set when its prompt is all in the cache
