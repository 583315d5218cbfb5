"""What a service knows about its engine's health: failures, reloads, and the bound on them.

When the scheduler thread stops on an unexpected error (:class:`~ggufllm.errors.EngineFailedError`),
the service reloads the model, at most ``RELOAD_LIMIT`` times in ``RELOAD_WINDOW_S``
seconds; past that it stays failed (every call raises) until ``load()`` is called.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Literal

__all__ = ["EngineHealth", "RELOAD_LIMIT", "RELOAD_WINDOW_S"]

RELOAD_LIMIT = 3
RELOAD_WINDOW_S = 600.0

State = Literal["ok", "reloading", "failed"]


class EngineHealth:
    """Failure and reload counters of one service's engine; thread-safe."""

    def __init__(self, limit: int = RELOAD_LIMIT, window_s: float = RELOAD_WINDOW_S) -> None:
        self._lock = threading.Lock()
        self._limit, self._window_s = limit, window_s
        self._recent: deque[float] = deque()
        self.state: State = "ok"
        self.failures = 0
        self.reloads = 0
        self.last_failure: str | None = None

    def failed(self, reason: str) -> bool:
        """Records a failure; True when a reload may be tried (within the bound)."""
        now = time.monotonic()
        with self._lock:
            self.failures += 1
            self.last_failure = reason
            self._recent.append(now)
            while self._recent and now - self._recent[0] > self._window_s:
                self._recent.popleft()
            self.state = "reloading" if len(self._recent) <= self._limit else "failed"
            return self.state == "reloading"

    def reloaded(self) -> None:
        with self._lock:
            self.state = "ok"
            self.reloads += 1

    def reload_failed(self, reason: str) -> None:
        with self._lock:
            self.state = "failed"
            self.last_failure = reason

    def reset(self) -> None:
        """An explicit load: the bound starts again."""
        with self._lock:
            self._recent.clear()
            self.state = "ok"

    def gave_up(self) -> str:
        """Why calls are refused, for :class:`~ggufllm.errors.EngineFailedError`."""
        return (f"gave up reloading after {len(self._recent)} failures in "
                f"{self._window_s / 60:.0f} minutes; call load() to try again")

    def as_info(self) -> dict[str, Any]:
        """``get_model_info()["engine"]``."""
        with self._lock:
            return {"state": self.state, "failures": self.failures, "reloads": self.reloads,
                    "last_failure": self.last_failure, "reload_limit": self._limit,
                    "reload_window_s": self._window_s}
