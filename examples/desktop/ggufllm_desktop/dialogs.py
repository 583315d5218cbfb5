"""ggufllm's errors as dialogs: a headline per class, the error's own message (which names
the remedy where the library knows one), and the app's advice where it has more to say.

Errors arrive from the engine process as a class name and a message; the class is looked
up among ggufllm's public names, so the table below matches subclasses as ``except`` would."""

from __future__ import annotations

import builtins

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox, QWidget

import ggufllm
from ggufllm import (
    ConfigError,
    ContextLengthExceededError,
    EngineError,
    GgufllmError,
    InvalidParameterError,
    KVCacheError,
    ModelLoadError,
    ModelNotFoundError,
    ServerBusyError,
    ServiceClosedError,
)

__all__ = ["describe", "show_error"]

# (class, headline, advice); the first class the error's class derives from wins
_TABLE: tuple[tuple[type[BaseException], str, str], ...] = (
    (ModelNotFoundError, "No model there", "Choose another file, or press Default model."),
    (ModelLoadError, "The model could not be loaded", "Choose another file, or press Default model."),
    (ContextLengthExceededError, "The context does not fit the model's window",
     "Shorten the context, or start the app with a larger window (MAX_LENGTH=8192; the "
     "KV cache grows with it)."),
    (ServerBusyError, "The engine is busy", "Wait for the answer under way, or press Stop."),
    (KVCacheError, "The saved KV cache cannot be used", "The app starts without it."),
    (ConfigError, "A setting is invalid", "Fix the environment variable named above and "
     "start the app again."),
    (InvalidParameterError, "The question cannot be asked", ""),
    (ServiceClosedError, "The model was closed", "Load a model again."),
    (EngineError, "The engine failed on this question", "ggufllm reloads the model by itself; "
     "ask again in a moment."),
    (GgufllmError, "ggufllm could not do that", ""),
    (Exception, "Unexpected error", "This is a bug in the app or in ggufllm; the log has "
     "the traceback."),
)


# errors of the app itself (no class of ggufllm's): name -> (headline, advice)
_APP_ERRORS: dict[str, tuple[str, str]] = {
    "EngineProcessError": ("The engine stopped", "Press Load to start it again."),
}


def _error_class(name: str) -> type[BaseException]:
    """ggufllm's (or Python's) exception class of that name; Exception when there is none."""
    cls = getattr(ggufllm, name) if name in ggufllm.__all__ else getattr(builtins, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else Exception


def describe(error: str, message: str) -> tuple[str, str]:
    """The dialog's headline and text for the error class named ``error``: its message
    (which names the remedy where ggufllm knows one), then the app's advice."""
    if error in _APP_ERRORS:
        headline, advice = _APP_ERRORS[error]
    else:
        cls = _error_class(error)
        headline, advice = next((h, a) for c, h, a in _TABLE if issubclass(cls, c))
    message = message or error
    return headline, f"{message}\n\n{advice}" if advice else message


def show_error(parent: QWidget, error: str, message: str) -> QMessageBox:
    """Shows an error in a window-modal dialog that does not block the event loop.

    Args:
        parent: the window.
        error: the exception's class name (``ModelNotFoundError``...).
        message: the exception's message.
    """
    headline, text = describe(error, message)
    box = QMessageBox(QMessageBox.Icon.Critical, "ggufllm", headline,
                      QMessageBox.StandardButton.Ok, parent)
    box.setObjectName("errorDialog")
    box.setInformativeText(text)
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    box.open()
    return box
