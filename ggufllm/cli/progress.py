"""Feedback on long work, on stderr and only on a terminal.

- :class:`LoadBar`: a tqdm bar for a model load that takes more than a moment.
- :class:`PromptSpinner`: a spinner (with evaluated/total prompt tokens when the
  engine reports them) while a prompt takes more than a second to evaluate.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

__all__ = ["LoadBar", "PromptSpinner", "is_terminal"]


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LoadBar:
    """A load progress callback that shows a bar once the load has taken ``delay`` seconds.

    Args:
        label: what is loading (the file name).
        enabled: False shows nothing (not a terminal, or ``--quiet``).
        delay: seconds before the bar appears (a quick load shows nothing).
        stream: where the bar goes (stderr).
    """

    def __init__(self, label: str, enabled: bool, delay: float = 0.5,
                 stream: IO[str] | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self.delay = delay
        self.stream = stream or sys.stderr
        self._t0: float | None = None
        self._bar: Any = None

    def __call__(self, fraction: float) -> bool:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        if self._bar is None and self.enabled and now - self._t0 >= self.delay and fraction < 1:
            from tqdm import tqdm

            self._bar = tqdm(total=100, desc=f"loading {self.label}", file=self.stream,
                             unit="%", leave=False, dynamic_ncols=True,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        if self._bar is not None:
            self._bar.n = min(100, int(fraction * 100))
            self._bar.refresh()
        return True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class PromptSpinner:
    """Shows ``⠋ evaluating the prompt: 1536/4096 tokens (2.1 s)`` from ``delay`` seconds
    after :meth:`start` until :meth:`stop` (the first token).

    :meth:`progress` is the engine's ``on_prompt_progress`` callback; without it the
    spinner shows the elapsed time only.
    """

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, enabled: bool, delay: float = 1.0, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self.delay = delay
        self.stream = stream or sys.stderr
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._counts: tuple[int, int] | None = None
        self._shown = False
        self._thread: threading.Thread | None = None

    def progress(self, n_done: int, n_total: int) -> None:
        self._counts = (n_done, n_total)

    def start(self) -> PromptSpinner:
        if self.enabled:
            self._t0 = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="ggufllm-spinner", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        if self._done.wait(self.delay):
            return
        i = 0
        while not self._done.is_set():
            counts = self._counts
            what = f": {counts[0]}/{counts[1]} tokens" if counts else ""
            line = (f"\r{self.FRAMES[i % len(self.FRAMES)]} evaluating the prompt{what} "
                    f"({time.monotonic() - self._t0:.1f} s)\033[K")
            with self._lock:
                if self._done.is_set():
                    return
                self.stream.write(line)
                self.stream.flush()
                self._shown = True
            i += 1
            self._done.wait(0.1)

    def stop(self) -> None:
        """Stops and erases the spinner line (idempotent)."""
        with self._lock:
            self._done.set()
            if self._shown:
                self.stream.write("\r\033[K")
                self.stream.flush()
                self._shown = False
