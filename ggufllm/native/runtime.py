"""llama.cpp's process-wide start: backends loaded once, its log routed to ``logging``, and
the cores to run on. The lowest layer: ``engine/`` and ``gpu/`` both import it."""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import llama_cpp.llama_cpp as lib

from .backends import load_backends

__all__ = ["ensure_backend", "default_threads"]

_native_logger = logging.getLogger("ggufllm.llama_cpp")
_backend_lock = threading.Lock()
_backend_ready = False
# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]


@lib.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp logs a lot at load time; its info lines go to debug so that
    # they never spray over the user's stderr.
    lvl = _last_level[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
    _last_level[0] = lvl
    if _native_logger.isEnabledFor(lvl):
        _native_logger.log(lvl, "%s", text.decode("utf-8", "replace").rstrip())


def ensure_backend() -> None:
    """Initializes llama.cpp once per process and routes its log to ``logging``."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            lib.llama_log_set(_log_callback, ctypes.c_void_p(0))
            load_backends()  # a cpu-portable build's CPU modules (a no-op otherwise)
            lib.llama_backend_init()
            _backend_ready = True


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
