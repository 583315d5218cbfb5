"""The engine's own process: one :class:`ggufllm.LLMService`, driven by JSON lines.

Why a process and not a thread: on a busy machine the engine's threads took the cores
the window needed, and the window froze for 100-250 ms at a time. A process of its own can
run at a lower priority (see ``ENGINE_NICENESS``), shares no GIL with the window, and a
crash in native code ends this process, not the app.

Commands (stdin), one JSON object a line::

    {"op": "load", "model_path": str | null, "state_dir": str}
    {"op": "cancel_load"}            at once, also for a load not yet started
    {"op": "ask", "question": str, "context": str | null}
    {"op": "stop"}                   at once: the answer under way ends at its next token
    {"op": "shutdown"}               saves the KV cache, frees the model, exits

Events (stdout), ``{"ev": name, ...}``: ``load_progress`` (fraction), ``loaded`` (info),
``load_cancelled``, ``cache_restored`` (n, path), ``cache_refused`` (why),
``prompt_progress`` (done, total), ``chunk`` (channel, text), ``answered`` (reason,
timings), ``info`` (info), ``failed`` (error: the class name, message), ``closed`` (message).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ggufllm import KVCacheError, LLMService, LoadCancelledError

from .session import SessionStore

logger = logging.getLogger("ggufllm_desktop.engine")

# The engine's threads keep every core busy while it reads a prompt or decodes; at the
# same priority the window and the X server wait for a core behind them, and on a busy
# 2-core machine the window froze for 100-250 ms at a time. Five steps lower (about a third
# of the CPU weight when they compete) the UI comes first; ten steps starved the engine
# itself whenever other programs kept the machine busy. An idle machine still gives the
# engine all its cores.
ENGINE_NICENESS = 5


class EngineServer:
    """Runs the commands: ``load``/``ask``/``shutdown`` one after another in a worker
    thread, ``cancel_load``/``stop`` at once from the reader.

    Args:
        emit: writes one event.
    """

    def __init__(self, emit: Callable[..., None]) -> None:
        self._emit = emit
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._service: LLMService | None = None
        self._store: SessionStore | None = None
        self._stop = threading.Event()

    def handle(self, command: dict[str, Any]) -> bool:
        """Takes one command; returns False after ``shutdown``."""
        op = command.get("op")
        if op == "cancel_load":
            if self._service is not None:
                self._service.cancel_load()
        elif op == "stop":
            self._stop.set()
        elif op == "load":
            self._queue_load(command.get("model_path"), Path(command["state_dir"]))
        elif op == "ask":
            self._stop.clear()
            self._jobs.put((self._ask, (self._service, command["question"], command.get("context"))))
        elif op == "shutdown":
            self._stop.set()
            self._jobs.put((self._shutdown, (self._service,)))
            self._jobs.put(None)
            return False
        else:
            self._emit("failed", error="InvalidParameterError", message=f"unknown command {op!r}")
        return True

    def run_jobs(self) -> None:
        """The worker thread's loop (until ``shutdown``)."""
        while (job := self._jobs.get()) is not None:
            fn, args = job
            try:
                fn(*args)
            except Exception as exc:  # every failure reaches the user as a dialog
                logger.debug("engine job failed", exc_info=True)
                self._emit("failed", error=type(exc).__name__, message=str(exc))

    def _queue_load(self, model_path: str | None, state_dir: Path) -> None:
        old = self._service
        self._store = SessionStore(state_dir)
        try:  # made here, so that a cancel_load right behind this command reaches it
            self._service = LLMService(model_path)
        except Exception as exc:  # ConfigError: an invalid environment variable
            self._service = None
            self._emit("failed", error=type(exc).__name__, message=str(exc))
            return
        self._jobs.put((self._load, (old, self._service)))

    # -- jobs ------------------------------------------------------------------

    def _load(self, old: LLMService | None, service: LLMService) -> None:
        if old is not None:
            self._save_and_close(old)
        shown = [-1]

        def progress(fraction: float) -> bool:
            if round(fraction * 100) != shown[0]:  # llama.cpp reports every tensor: say each 1%
                shown[0] = round(fraction * 100)
                self._emit("load_progress", fraction=fraction)
            return True

        try:
            service.load(progress)
        except LoadCancelledError:
            self._emit("load_cancelled")
            return
        path = self._kv_path(service)
        if path.is_file():
            try:
                self._emit("cache_restored", n=service.load_kv_cache(path), path=str(path))
            except KVCacheError as exc:  # another build or setting: start cold, and say so
                self._emit("cache_refused", why=str(exc))
        self._emit("loaded", info=service.get_model_info())

    def _ask(self, service: LLMService | None, question: str, context: str | None) -> None:
        if service is None:
            raise RuntimeError("no model is loaded")
        reason, timings = "cancelled", None

        def progress(done: int, total: int) -> None:
            self._emit("prompt_progress", done=done, total=total)

        with closing(service.stream(question, context, on_prompt_progress=progress)) as chunks:
            for chunk in chunks:
                if chunk.text:
                    self._emit("chunk", channel=chunk.channel, text=chunk.text)
                if chunk.finish_reason is not None:
                    reason, timings = chunk.finish_reason, chunk.timings
                if self._stop.is_set():
                    break  # closing the stream cancels the request
        # the figures first: a window that sees the answer end shows the KV cache after it
        self._emit("info", info=service.get_model_info())
        self._emit("answered", reason=reason, timings=asdict(timings) if timings else None)

    def _shutdown(self, service: LLMService | None) -> None:
        message = "no model was loaded; nothing to save"
        if service is not None:
            message = self._save_and_close(service)
        self._emit("closed", message=message)

    def _save_and_close(self, service: LLMService) -> str:
        """Saves the KV cache of ``service`` (when it has a model) and frees it."""
        try:
            if not service.is_loaded:
                return "no model was loaded; nothing to save"
            path = self._kv_path(service)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                n = service.save_kv_cache(path)
            except OSError as exc:
                logger.error("could not save the KV cache to %s: %s", path, exc)
                return f"the KV cache could not be saved: {exc}"
            return f"saved {n} cached prompt(s) to {path}"
        finally:
            service.close()

    def _kv_path(self, service: LLMService) -> Path:
        assert self._store is not None
        return self._store.kv_path(service.get_model_info()["model_path"])


def main() -> None:
    """Serves commands from stdin until ``shutdown`` or end of input."""
    # stdout carries the events only: whatever else writes to fd 1 (native code, a stray
    # print) goes to stderr with the log
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, format="engine %(levelname)s %(name)s: %(message)s")
    if hasattr(os, "nice"):  # the window and the X server before the engine (POSIX only)
        os.nice(ENGINE_NICENESS)
    lock = threading.Lock()

    def emit(event: str, **fields: Any) -> None:
        line = json.dumps({"ev": event, **fields}, default=str)
        with lock:
            out.write(line + "\n")
            out.flush()

    server = EngineServer(emit)
    worker = threading.Thread(target=server.run_jobs, name="desktop-engine")
    worker.start()
    running = True
    for line in sys.stdin:
        if line.strip() and not (running := server.handle(json.loads(line))):
            break
    if running:  # the app went away without a shutdown: save and free all the same
        server.handle({"op": "shutdown"})
    worker.join()


if __name__ == "__main__":
    main()
