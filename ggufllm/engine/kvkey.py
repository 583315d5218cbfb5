"""The per-user key that signs saved KV-cache files.

A KV file pairs prompt tokens with the K/V state computed from them, and llama.cpp cannot
tell whether the two belong together: a file whose tokens were swapped for another
document's would make questions about that document reuse the wrong cells. So files are
signed (HMAC-SHA256, :mod:`~.kvfile`) under a random key that only this user can read:
``$XDG_CACHE_HOME/ggufllm/kv-key`` (``~/.cache/ggufllm/kv-key`` when XDG_CACHE_HOME is
unset or relative, as the XDG spec says), 32 bytes, mode 0600, made on first use and
never overwritten. Deleting it makes every file signed with it untrusted.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

__all__ = ["KEY_BYTES", "key_path", "user_key"]

logger = logging.getLogger(__name__)

KEY_BYTES = 32


def key_path() -> Path:
    """Where this user's key lives (it may not exist yet)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "ggufllm" / "kv-key"


def user_key() -> bytes:
    """This user's key, made on first use.

    Two processes making it at once get the same key: it is written to a private
    temporary file and linked to its name, which fails if the name exists.

    Raises:
        OSError: the key cannot be made or read, or the file there is not a key.
    """
    path = key_path()
    try:
        return _read(path)
    except FileNotFoundError:
        _create(path)
    return _read(path)


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        key = f.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        raise OSError(f"{path} is not a ggufllm key ({len(key)} bytes, expected {KEY_BYTES}); "
                      "delete it to make a new one (files signed with the old key will then "
                      "need trusted=True)")
    if os.name == "posix" and mode & 0o077:
        logger.warning("%s can be read by other users, who could then sign KV-cache files "
                       "that your ggufllm trusts: chmod 600 it", path)
    return key


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kv-key.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and never replaces a key made meanwhile
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
