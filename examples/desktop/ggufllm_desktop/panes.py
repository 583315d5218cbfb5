"""The answer pane (the answer, with gpt-oss's reasoning folded apart) and the model pane."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import QPlainTextEdit, QToolButton, QVBoxLayout, QWidget

__all__ = ["AnswerPane", "InfoPane", "info_rows"]


class AnswerPane(QWidget):
    """Shows a streamed answer: ``final`` text in the answer view, every other channel
    (gpt-oss's ``analysis`` reasoning) in a folded view below it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.answer_view = QPlainTextEdit(readOnly=True, placeholderText="The answer streams in here.")
        self.reasoning_toggle = QToolButton(checkable=True, arrowType=Qt.ArrowType.RightArrow,
                                            toolButtonStyle=Qt.ToolButtonStyle.ToolButtonTextBesideIcon,
                                            autoRaise=True)
        self.reasoning_view = QPlainTextEdit(readOnly=True, visible=False)
        self.reasoning_toggle.toggled.connect(self._fold)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.answer_view, 3)
        layout.addWidget(self.reasoning_toggle)
        layout.addWidget(self.reasoning_view, 2)
        self._n_reasoning = 0
        self.clear()

    def clear(self) -> None:
        self.answer_view.clear()
        self.reasoning_view.clear()
        self._n_reasoning = 0
        self._label_reasoning()

    def append(self, channel: str, text: str) -> None:
        """Adds one chunk's text to the view of its channel."""
        view = self.answer_view if channel == "final" else self.reasoning_view
        view.moveCursor(QTextCursor.MoveOperation.End)
        view.insertPlainText(text)
        if channel != "final":
            self._n_reasoning += len(text)
            self._label_reasoning()

    def answer_text(self) -> str:
        return self.answer_view.toPlainText()

    def reasoning_text(self) -> str:
        return self.reasoning_view.toPlainText()

    def _label_reasoning(self) -> None:
        self.reasoning_toggle.setEnabled(self._n_reasoning > 0)
        self.reasoning_toggle.setText(f"Reasoning ({self._n_reasoning} characters)"
                                      if self._n_reasoning else "Reasoning (none: this model "
                                      "answers without a reasoning channel)")

    def _fold(self, unfolded: bool) -> None:
        self.reasoning_view.setVisible(unfolded)
        self.reasoning_toggle.setArrowType(Qt.ArrowType.DownArrow if unfolded
                                           else Qt.ArrowType.RightArrow)


class InfoPane(QPlainTextEdit):
    """What ``LLMService.get_model_info()`` says about the model, its placement and KV cache.

    Plain text in a box of fixed height: new figures after each answer repaint the box
    and never lay the window out again.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("No model loaded.", parent, readOnly=True)
        self.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.setFixedHeight(self.fontMetrics().lineSpacing() * 7 + 12)

    def show_info(self, info: dict[str, Any]) -> None:
        self.setPlainText("\n".join(f"{k:<10} {v}" for k, v in info_rows(info)))


def _mib(n: Any) -> str:
    return f"{n / 2**20:.1f} MiB" if isinstance(n, int | float) else "?"


def info_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The model pane's rows, from ``get_model_info()`` (missing fields read ``?``)."""
    g = info.get
    kv: dict[str, Any] = g("kv_cache") or {}
    rows = [
        ("Model", f"{g('model_name', '?')} ({g('architecture', '?')}, {g('quantization', '?')})"),
        ("File", f"{g('model_path', '?')} [{g('source', '?')}]"),
        ("Placement", f"{g('device', '?')}: {g('layers_on_gpu', 0)} layers on the GPU, "
                      f"{g('host_memory_used_mib', '?')} MiB host, "
                      f"{g('gpu_memory_used_mib', '?')} MiB GPU"),
        ("Window", f"{g('n_ctx', '?')} tokens per request, {kv.get('n_parallel', '?')} slots"),
    ]
    if kv:
        rows += [
            ("KV cache", f"{kv.get('type', '?')}, {_mib(kv.get('bytes'))}, "
                         f"{kv.get('tokens_in_use', '?')} tokens in use, "
                         f"{kv.get('prefixes_in_slots', '?')} prefixes in slots, "
                         f"{kv.get('ram_entries', '?')} in RAM ({_mib(kv.get('ram_bytes'))})"),
            ("Reuse", f"{kv.get('tokens_reused', '?')} prompt tokens reused in slots, "
                      f"{kv.get('ram_tokens_restored', '?')} restored from RAM, "
                      f"{kv.get('tokens_evaluated', '?')} evaluated"),
        ]
    return rows
