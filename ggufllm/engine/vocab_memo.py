"""What is worth computing once per loaded vocabulary (its control tokens, the grammar
probes' index), kept by the ``llama_vocab`` address for as long as its model is loaded:
:meth:`NativeModel.close <ggufllm.engine.native.NativeModel.close>` forgets it before freeing
the model, so a model loaded later at the same address never finds another one's values.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["forget", "known", "remember"]

T = TypeVar("T")

_values: dict[int | None, dict[str, Any]] = {}
_locks: dict[tuple[int | None, str], threading.Lock] = {}
_lock = threading.Lock()


def _address(vocab: object) -> int | None:
    return ctypes.cast(vocab, ctypes.c_void_p).value


def remember(vocab: object, name: str, make: Callable[[], T]) -> T:
    """``make()`` computed once for ``vocab`` (other vocabularies are not held up meanwhile)."""
    address = _address(vocab)
    with _lock:
        held = _values.get(address, {})
        if name in held:
            return held[name]
        lock = _locks.setdefault((address, name), threading.Lock())
    with lock:
        with _lock:
            held = _values.get(address, {})
            if name in held:
                return held[name]
        value = make()
        with _lock:
            _values.setdefault(address, {})[name] = value
        return value


def known(vocab: object, name: str) -> Any:
    """What ``remember`` holds for ``vocab`` under ``name``, or None (nothing is computed)."""
    with _lock:
        return _values.get(_address(vocab), {}).get(name)


def forget(vocab: object) -> None:
    """Drops everything remembered for ``vocab`` (its model is about to be freed)."""
    address = _address(vocab)
    with _lock:
        _values.pop(address, None)
        for key in [k for k in _locks if k[0] == address]:
            del _locks[key]
