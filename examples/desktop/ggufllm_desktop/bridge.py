"""The window's side of the engine: a QProcess running :mod:`.engine_process`, its events
turned into Qt signals.

Every method returns at once: a command is one line written to the process's stdin, and
its events come back on stdout, read when Qt says there is something to read. The UI
thread never waits on the engine, and shares no interpreter (no GIL) with it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, Signal

from ggufllm import Timings

__all__ = ["EngineBridge"]

logger = logging.getLogger(__name__)

# the events that become a signal of the same name, and the fields that are its arguments
_EVENTS: dict[str, tuple[str, ...]] = {
    "chunk": ("channel", "text"),
    "load_progress": ("fraction",),
    "prompt_progress": ("done", "total"),
    "loaded": ("info",),
    "info": ("info",),
    "load_cancelled": (),
    "cache_restored": ("n", "path"),
    "cache_refused": ("why",),
    "failed": ("error", "message"),
}
# the folder that holds the ggufllm_desktop package: the engine process imports it from there
_APP_ROOT = str(Path(__file__).resolve().parent.parent)


class EngineBridge(QObject):
    """One engine process and the signals of what it says.

    Args:
        state_dir: where the KV cache of each model is kept (restored after a load,
            saved by :meth:`shutdown`).
        parent: the owning QObject.
    """

    load_progress = Signal(float)           # 0..1
    loaded = Signal(dict)                   # get_model_info()
    load_cancelled = Signal()
    cache_restored = Signal(int, str)       # prefixes restored, from which file
    cache_refused = Signal(str)             # why a saved KV cache was not used
    prompt_progress = Signal(int, int)      # prompt tokens done (evaluated or reused), of
    chunk = Signal(str, str)                # channel, text
    answered = Signal(str, object)          # finish reason, Timings or None
    info = Signal(dict)                     # get_model_info(), after each answer
    failed = Signal(str, str)               # the error's class name, its message
    closed = Signal(str)                    # what became of the KV cache at exit

    def __init__(self, state_dir: Path, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._state_dir = state_dir
        self._closing = False
        self._closed_message = ""
        self._process = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONPATH", os.pathsep.join(p for p in (_APP_ROOT, env.value("PYTHONPATH")) if p))
        self._process.setProcessEnvironment(env)
        # its log goes straight to the app's stderr; only events pass through this thread
        self._process.setProcessChannelMode(QProcess.ProcessChannelMode.ForwardedErrorChannel)
        self._process.setReadChannel(QProcess.ProcessChannel.StandardOutput)
        self._process.readyReadStandardOutput.connect(self._read_events)
        self._process.finished.connect(self._on_finished)
        self._start()

    def _start(self) -> None:
        self._process.start(sys.executable, ["-m", "ggufllm_desktop.engine_process"])

    # -- commands -------------------------------------------------------------

    def load(self, model_path: str | None) -> None:
        """Loads ``model_path`` (None: ggufllm's default) in place of the current model."""
        self._send(op="load", model_path=model_path, state_dir=str(self._state_dir))

    def cancel_load(self) -> None:
        """Stops the load under way at its next progress report."""
        self._send(op="cancel_load")

    def ask(self, question: str, context: str | None) -> None:
        """Streams the answer to ``question`` over ``context`` as :attr:`chunk` signals."""
        self._send(op="ask", question=question, context=context)

    def stop(self) -> None:
        """Ends the answer under way at its next token (it finishes as ``cancelled``)."""
        self._send(op="stop")

    def shutdown(self) -> None:
        """Stops what runs, saves the KV cache, frees the model, then emits :attr:`closed`."""
        self._closing = True
        self._send(op="shutdown")

    def _send(self, **command: Any) -> None:
        if self._process.state() is QProcess.ProcessState.NotRunning:
            self._start()  # it ended (a crash was reported): a new one, without a model yet
        self._process.write((json.dumps(command) + "\n").encode())

    # -- events ---------------------------------------------------------------

    def _read_events(self) -> None:
        while self._process.canReadLine():
            line = bytes(self._process.readLine().data()).decode(errors="replace")
            try:
                event = json.loads(line)
                name = event.pop("ev")
            except (ValueError, KeyError, AttributeError):
                logger.warning("unexpected line from the engine: %r", line)
                continue
            self._dispatch(name, event)

    def _dispatch(self, name: str, event: dict[str, Any]) -> None:
        if name == "answered":
            timings = Timings(**event["timings"]) if event["timings"] else None
            self.answered.emit(event["reason"], timings)
        elif name == "closed":
            self._closed_message = event["message"]  # emitted once the process has exited
        elif name in _EVENTS:
            getattr(self, name).emit(*(event[field] for field in _EVENTS[name]))
        else:
            logger.warning("unknown event from the engine: %s", name)

    def _on_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        if self._closing:
            self.closed.emit(self._closed_message or f"the engine process ended (exit code "
                             f"{code}) before it saved the KV cache")
            return
        how = "crashed" if status is QProcess.ExitStatus.CrashExit else f"exited with code {code}"
        self.failed.emit("EngineProcessError", f"the engine process {how}; load the model again")
