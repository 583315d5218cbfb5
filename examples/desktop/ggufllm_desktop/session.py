"""What the app keeps between launches, in the user's cache folder.

    <cache>/ggufllm-desktop/
        session.json        the model choice, the context and the last question
        kv-<hash>.bin       the KV cache of one model file (written by ``save_kv_cache``)

The context is kept with the KV cache on purpose: a saved prefix only helps when the
next launch asks about the same document, so the document comes back with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Session", "SessionStore", "default_folder"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Session:
    """The state one launch hands to the next.

    Attributes:
        model_path: the ``.gguf`` file chosen, or None for ggufllm's default model
            (``LLM_MODEL_PATH``, else ``models/llm/``, else the embedded one).
        context: the text of the context pane.
        question: the last question asked.
    """

    model_path: str | None = None
    context: str = ""
    question: str = ""


class SessionStore:
    """Reads and writes a :class:`Session` and names the KV-cache file of each model.

    Args:
        folder: where the files live (made on first write).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._file = folder / "session.json"

    def read(self) -> Session:
        """The saved session; a fresh one when there is none or it cannot be read."""
        try:
            data = json.loads(self._file.read_text(encoding="utf-8"))
            return Session(model_path=data.get("model_path"), context=str(data.get("context", "")),
                           question=str(data.get("question", "")))
        except FileNotFoundError:
            return Session()
        except (OSError, ValueError, AttributeError) as exc:
            logger.warning("ignoring the saved session %s: %s", self._file, exc)
            return Session()

    def write(self, session: Session) -> None:
        """Saves ``session`` atomically (a crash leaves the old file, never half a new one)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self._file.with_suffix(".json.partial")
        partial.write_text(json.dumps(asdict(session), ensure_ascii=False), encoding="utf-8")
        os.replace(partial, self._file)

    def kv_path(self, model_file: str) -> Path:
        """The KV-cache file for the model at ``model_file`` (one per model: a cache saved
        with another model is refused by ``load_kv_cache``)."""
        digest = hashlib.sha256(os.path.abspath(model_file).encode()).hexdigest()[:16]
        return self.folder / f"kv-{digest}.bin"


def default_folder() -> Path:
    """The user's cache folder for this app (``~/.cache/ggufllm-desktop`` on Linux).

    Call it after the QApplication is made: Qt names the folder after the application.
    """
    from PySide6.QtCore import QStandardPaths  # not at import: the engine process needs no Qt

    return Path(QStandardPaths.writableLocation(QStandardPaths.StandardLocation.CacheLocation))
