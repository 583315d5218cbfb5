"""A request to the scheduler: its prompt, sampling, reader, sink and cancel flag."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..config import GenerationConfig
from .native import Sampler
from .output import OutputReader
from .slots import Slot

__all__ = ["Request", "Sink", "ProgressCallback"]

# A sink receives a list of chunks (the last list ends with the chunk carrying the
# finish reason) or an exception; it is called from the scheduler thread.
Sink = Callable[[Any], None]
ProgressCallback = Callable[[int, int], None]


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
    """

    __slots__ = ("prompt", "cfg", "reader", "sink", "on_prompt_progress", "cancel", "slot",
                 "sampler", "n_done", "n_cached", "n_gen", "next_token", "t_start", "t_first")

    def __init__(self, prompt: Sequence[int], cfg: GenerationConfig, reader: OutputReader,
                 sink: Sink, on_prompt_progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.prompt = list(prompt)
        self.cfg = cfg
        self.reader = reader
        self.sink = sink
        self.on_prompt_progress = on_prompt_progress
        self.cancel = cancel if cancel is not None else threading.Event()
        self.slot: Slot | None = None
        self.sampler: Sampler | None = None
        self.n_done = self.n_cached = self.n_gen = 0
        self.next_token = -1  # sampled, shown, not yet in the cache
        self.t_start = self.t_first = 0.0

    @property
    def generating(self) -> bool:
        return self.next_token >= 0
