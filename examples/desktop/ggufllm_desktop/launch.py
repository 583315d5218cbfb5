"""The app's entry point: arguments, logging, the QApplication and the window."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from PySide6.QtWidgets import QApplication

from .session import SessionStore, default_folder
from .window import MainWindow

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the app until its window is closed; returns the exit status."""
    parser = argparse.ArgumentParser(prog="ggufllm-desktop", description=__doc__)
    parser.add_argument("--model", help="a .gguf file (default: the last one chosen, else "
                        "ggufllm's default model)")
    parser.add_argument("--state-dir", type=Path, help="where the session and the KV cache "
                        "are kept (default: the user's cache folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = QApplication(sys.argv[:1])
    app.setApplicationName("ggufllm-desktop")
    window = MainWindow(SessionStore(args.state_dir or default_folder()), args.model)
    window.show()
    return app.exec()
