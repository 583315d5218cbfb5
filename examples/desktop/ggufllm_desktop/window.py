"""The main window: a model, a context, a question, and the answer streaming in.

The window never calls the engine itself: :class:`~.bridge.EngineBridge` sends every
call to the engine's process and turns what it says into signals, so the event loop keeps
running while a model loads or an answer is generated.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from ggufllm import Timings

from .bridge import EngineBridge
from .dialogs import show_error
from .panes import AnswerPane, InfoPane
from .session import Session, SessionStore

__all__ = ["MainWindow", "Phase"]


class Phase(enum.Enum):
    """What the window is doing; it decides which controls are enabled."""

    UNLOADED = "no model"      # never loaded, cancelled or failed
    LOADING = "loading"
    READY = "ready"
    ANSWERING = "answering"
    STOPPING = "stopping"
    CLOSING = "closing"        # the KV cache is being saved
    CLOSED = "closed"


# the controls each phase enables (every other one is disabled)
_ENABLED: dict[Phase, frozenset[str]] = {
    Phase.UNLOADED: frozenset({"choose_button", "default_button", "load_button",
                               "open_button", "context_edit"}),
    Phase.LOADING: frozenset({"cancel_button", "open_button", "context_edit", "question_edit"}),
    Phase.READY: frozenset({"choose_button", "default_button", "open_button", "context_edit",
                            "question_edit", "ask_button"}),
    Phase.ANSWERING: frozenset({"stop_button"}),
    Phase.STOPPING: frozenset(),
    Phase.CLOSING: frozenset(),
    Phase.CLOSED: frozenset(),
}


class MainWindow(QMainWindow):
    """The app's window. It starts loading the session's model as soon as it is made.

    Args:
        store: where the session and the KV cache are kept between launches.
        model_path: a ``.gguf`` file to load instead of the session's choice.
    """

    def __init__(self, store: SessionStore, model_path: str | None = None) -> None:
        super().__init__()
        self.setWindowTitle("ggufllm — questions over a document")
        self._store = store
        session = store.read()
        self._model_path = model_path if model_path is not None else session.model_path
        self.phase = Phase.UNLOADED
        self.last_finish: str | None = None
        self.last_timings: Timings | None = None
        self.closed_message: str | None = None  # what became of the KV cache at exit
        self.bridge = EngineBridge(store.folder, self)
        # QProgressBar.setValue repaints at once (not at the next paint): at most 10 a second
        self._load_fraction = 0.0
        self._bar_timer = QTimer(self, singleShot=True, interval=100)
        self._bar_timer.timeout.connect(lambda: self.load_bar.setValue(round(self._load_fraction * 1000)))
        self._build()
        self._wire()
        self.context_edit.setPlainText(session.context)
        self.question_edit.setText(session.question)
        self.load_model(self._model_path)

    # -- layout --------------------------------------------------------------

    def _build(self) -> None:
        self.model_label = QLabel()
        self.choose_button = QPushButton("Open model…")
        self.default_button = QPushButton("Default model")
        self.load_button = QPushButton("Load")
        self.load_bar = QProgressBar(maximum=1000, textVisible=True, format="Loading %p%")
        self.cancel_button = QPushButton("Cancel")
        self.context_edit = QPlainTextEdit(placeholderText="Paste the document here, or open a file.")
        self.open_button = QPushButton("Open file…")
        self.question_edit = QLineEdit(placeholderText="Ask a question about the document")
        self.ask_button = QPushButton("Ask", default=True)
        self.stop_button = QPushButton("Stop")
        self.answer = AnswerPane()
        self.info_pane = InfoPane()
        model_row = _row(QLabel("Model:"), (self.model_label, 1), self.choose_button,
                         self.default_button, self.load_button)
        load_row = _row((self.load_bar, 1), self.cancel_button)
        self._load_row = QWidget()
        self._load_row.setLayout(load_row)
        left = _box("Context", self.context_edit, _row(self.open_button, 1))
        right = QWidget()
        column = QVBoxLayout(right)
        column.setContentsMargins(0, 0, 0, 0)
        column.addLayout(_row((self.question_edit, 1), self.ask_button, self.stop_button))
        column.addWidget(self.answer, 1)
        column.addWidget(_box("Model", self.info_pane))
        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(left)
        splitter.addWidget(right)
        splitter.setSizes([420, 580])
        central = QWidget()
        main = QVBoxLayout(central)
        main.addLayout(model_row)
        main.addWidget(self._load_row)
        main.addWidget(splitter, 1)
        self.setCentralWidget(central)
        self.resize(1000, 680)

    def _wire(self) -> None:
        b = self.bridge
        self.choose_button.clicked.connect(self._choose_model)
        self.default_button.clicked.connect(lambda: self.load_model(None))
        self.load_button.clicked.connect(lambda: self.load_model(self._model_path))
        self.cancel_button.clicked.connect(self._cancel_load)
        self.open_button.clicked.connect(self._open_context)
        self.ask_button.clicked.connect(self.ask)
        self.question_edit.returnPressed.connect(self.ask)
        self.stop_button.clicked.connect(self.stop)
        b.load_progress.connect(self._on_load_progress)
        b.loaded.connect(self._on_loaded)
        b.load_cancelled.connect(self._on_load_cancelled)
        b.cache_restored.connect(self._on_cache_restored)
        b.cache_refused.connect(lambda why: self._say(f"Starting without the saved KV cache: {why}"))
        b.prompt_progress.connect(self._on_prompt_progress)
        b.chunk.connect(self.answer.append)
        b.answered.connect(self._on_answered)
        b.info.connect(self.info_pane.show_info)
        b.failed.connect(self._on_failed)
        b.closed.connect(self._on_closed)

    # -- actions -------------------------------------------------------------

    def load_model(self, model_path: str | None) -> None:
        """Starts loading ``model_path`` (None: ggufllm's default model)."""
        self._model_path = model_path
        self.model_label.setText(model_path or "the default model (LLM_MODEL_PATH, models/llm/ "
                                 "or the embedded Gemma 3 270M)")
        self.bridge.load(model_path)
        self.load_bar.setValue(0)
        self._set_phase(Phase.LOADING)
        self._say("Loading the model…")

    def ask(self) -> None:
        """Asks the question in the question box about the context pane's text."""
        question = self.question_edit.text().strip()
        if self.phase is not Phase.READY or not question:
            return
        self.answer.clear()
        self.last_finish = self.last_timings = None
        self._set_phase(Phase.ANSWERING)
        self._say("Reading the document…")
        self.bridge.ask(question, self.context_edit.toPlainText() or None)

    def stop(self) -> None:
        """Stops the answer under way (it keeps what was generated so far)."""
        if self.phase is Phase.ANSWERING:
            self._set_phase(Phase.STOPPING)
            self.bridge.stop()

    def _cancel_load(self) -> None:
        self.bridge.cancel_load()
        self._say("Cancelling the load…")
        self.cancel_button.setEnabled(False)

    def _choose_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a GGUF model", "", "GGUF models (*.gguf)")
        if path:
            self.load_model(path)

    def _open_context(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a document", "",
                                              "Text (*.txt *.md *.rst *.csv *.json);;All files (*)")
        if path:
            try:
                self.context_edit.setPlainText(Path(path).read_text(encoding="utf-8",
                                                                    errors="replace"))
            except OSError as exc:
                show_error(self, type(exc).__name__, str(exc))

    # -- what the engine says ------------------------------------------------

    def _on_loaded(self, info: dict[str, Any]) -> None:
        self.info_pane.show_info(info)
        self.model_label.setText(f"{info.get('model_name')} — {info.get('model_path')}")
        self._set_phase(Phase.READY)
        if not self.statusBar().currentMessage().startswith(("Restored", "Starting without")):
            self._say("Ready.")

    def _on_load_progress(self, fraction: float) -> None:
        self._load_fraction = fraction
        if not self._bar_timer.isActive():
            self._bar_timer.start()

    def _on_cache_restored(self, n: int, path: str) -> None:
        if n:  # a file saved before any question holds no prompt
            self._say(f"Restored {n} cached prompt(s) from {path}: questions over the same "
                      "document start without reading it again.")

    def _on_load_cancelled(self) -> None:
        self._set_phase(Phase.UNLOADED)
        self._say("The load was cancelled. Press Load to load the model again.")

    def _on_prompt_progress(self, done: int, total: int) -> None:
        if self.phase is Phase.ANSWERING and total:
            self._say(f"Reading the document: {done} of {total} prompt tokens…")

    def _on_answered(self, reason: str, timings: Timings | None) -> None:
        self.last_finish, self.last_timings = reason, timings
        self._set_phase(Phase.READY)
        self._say(_answer_summary(reason, timings))

    def _on_failed(self, error: str, message: str) -> None:
        if self.phase in (Phase.CLOSING, Phase.CLOSED):
            return  # the app is going away: the log has it
        loaded = self.phase in (Phase.ANSWERING, Phase.STOPPING, Phase.READY)
        self._set_phase(Phase.READY if loaded and error != "EngineProcessError" else Phase.UNLOADED)
        self._say(f"Error: {message}")
        show_error(self, error, message)

    # -- closing: save the KV cache first ------------------------------------

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt's name)
        if self.phase is Phase.CLOSED:
            event.accept()
            return
        event.ignore()  # closes for real once the worker has saved the KV cache
        if self.phase is Phase.CLOSING:
            return
        self._store.write(Session(self._model_path, self.context_edit.toPlainText(),
                                  self.question_edit.text()))
        self._set_phase(Phase.CLOSING)
        self._say("Saving the KV cache…")
        self.bridge.shutdown()

    def _on_closed(self, message: str) -> None:
        self.closed_message = message
        self._set_phase(Phase.CLOSED)
        self.close()

    # -- helpers -------------------------------------------------------------

    def _set_phase(self, phase: Phase) -> None:
        self.phase = phase
        enabled = _ENABLED[phase]
        for name in ("choose_button", "default_button", "load_button", "cancel_button",
                     "open_button", "context_edit", "question_edit", "ask_button", "stop_button"):
            getattr(self, name).setEnabled(name in enabled)
        self._load_row.setVisible(phase is Phase.LOADING)
        self.load_button.setVisible(phase is Phase.UNLOADED)

    def _say(self, message: str) -> None:
        self.statusBar().showMessage(message)


def _answer_summary(reason: str, timings: Timings | None) -> str:
    """The status line after an answer: how it ended and what the KV cache saved."""
    ended = {"stop": "Answered", "length": "Answered (the token budget ran out)",
             "cancelled": "Stopped"}.get(reason, f"Ended ({reason})")
    if timings is None:
        return f"{ended}."
    rate = timings.decode_tokens_per_s
    return (f"{ended}: {timings.n_generated} tokens at {rate:.{0 if rate >= 10 else 1}f}/s; "
            f"prompt {timings.n_prompt} tokens, {timings.n_cached} of them from the KV cache, "
            f"read in {timings.prompt_s:.2f} s.")


def _row(*items: QWidget | tuple[QWidget, int] | int) -> QHBoxLayout:
    """A row of widgets; ``(widget, n)`` gives the widget stretch n, a lone int is a spacer."""
    row = QHBoxLayout()
    row.setContentsMargins(0, 0, 0, 0)
    for item in items:
        if isinstance(item, int):
            row.addStretch(item)
        elif isinstance(item, tuple):
            row.addWidget(*item)
        else:
            row.addWidget(item)
    return row


def _box(title: str, *items: QWidget | QHBoxLayout) -> QGroupBox:
    """A titled group of widgets and rows, stacked."""
    box = QGroupBox(title)
    column = QVBoxLayout(box)
    for item in items:
        if isinstance(item, QWidget):
            column.addWidget(item)
        else:
            column.addLayout(item)
    return box
