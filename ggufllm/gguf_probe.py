"""The probe load: llama.cpp opens a file once in a child process before this one does.

The static checks (:mod:`ggufllm.gguf_checks`) refuse every abort we know of.
The probe is the second line of defence for the ones we do not: a child process
loads the hyper-parameters, the vocabulary and the tensor shapes (``no_alloc``:
no weight is read) and tokenizes a sample text. If llama.cpp aborts, only the
child dies and the caller gets :class:`ModelLoadError`. It also brings back
llama.cpp's own reason when it refuses a file.

A file that passed is remembered by identity (real path, size, modification
time) under the user cache folder, so each file is probed once. Set
``GGUFLLM_PROBE=0`` to turn the probe off (the static checks stay on).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from .errors import ModelLoadError

__all__ = ["probe_enabled", "probe_model_file", "PROBE_ENV"]

logger = logging.getLogger(__name__)

PROBE_ENV = "GGUFLLM_PROBE"
# Parsing the gpt-oss vocabulary (201k tokens, 446k merges) takes about a second;
# a probe still running after this long is hung (a rope width of 0 loops forever).
PROBE_TIMEOUT_S = 120.0
_CHILD = Path(__file__).parent / "native" / "_probe_child.py"


def probe_enabled() -> bool:
    """False when ``GGUFLLM_PROBE`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(PROBE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ggufllm" / "probed"


def _identity(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()


def _remember(key: str) -> None:
    try:
        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / key).touch()
    except OSError as exc:  # a read-only home only costs a probe per load
        logger.debug("cannot record the probe result: %s", exc)


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def probe_model_file(path: str | os.PathLike[str], *, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Loads ``path``'s metadata and vocabulary in a child process, once per file identity.

    Args:
        path: a GGUF file that passed :func:`ggufllm.gguf_file.read_gguf_header`.
        timeout: seconds before a silent child counts as hung.

    Raises:
        ModelLoadError: llama.cpp aborted, hung or refused the file in the child.
    """
    p = Path(path)
    key = _identity(p)
    if (_cache_dir() / key).exists():
        return
    try:
        # GGML_NO_BACKTRACE: an abort would otherwise attach gdb for a backtrace (seconds)
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        # a PyInstaller bundle is its own sys.executable and runs _CHILD (packaging/entry.py)
        done = subprocess.run([sys.executable, str(_CHILD), str(p)], capture_output=True,
                              text=True, errors="replace", timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(str(p), [f"llama.cpp did not finish reading the file's metadata "
                                      f"in {timeout:.0f} s (probe load)"]) from None
    except OSError as exc:  # no interpreter to start: static checks only
        logger.warning("probe load unavailable (%s); relying on the static checks", exc)
        return
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode < 0:
        raise ModelLoadError(str(p), [f"llama.cpp aborts on this file "
                                      f"({_signal_name(done.returncode)} in a probe load)"])
    if last.startswith("refused\t"):
        raise ModelLoadError(str(p), [f"llama.cpp refused the file: {last.split(chr(9), 1)[1]}"])
    if done.returncode != 0 or last != "ok":
        # the child could not run (no llama_cpp in that interpreter...): not the file's fault
        logger.warning("probe load failed to run (exit %s): %s", done.returncode,
                       done.stderr.strip()[-300:])
        return
    _remember(key)
