"""Saved KV caches: one file holding every cached prefix (tokens and sequence state),
stamped with what the state is valid for.

Layout (little-endian)::

    b"GGUFLLM-KVCACHE\\n"                 16 bytes
    u32 format version, u64 header length
    header: JSON {"identity": {...}, "entries": [[n_tokens, n_state_bytes], ...]}
    per entry: n_tokens int32 tokens, then n_state_bytes of llama_state_seq_get_data
    sha256 of everything above           32 bytes

The file is written to a temporary name, fsynced and renamed, so a crash leaves the old
file or the new one. Reading checks the length, the checksum and then the identity
before any byte reaches llama.cpp: another model, llama.cpp build or context setting
raises :class:`KVCacheMismatchError`; a truncated or garbage file :class:`KVCacheError`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KVCacheError, KVCacheMismatchError
from ..gguf_file import GGUFSummary
from .kvcache import CachedPrefix

__all__ = ["KVCacheIdentity", "model_fingerprint", "llama_build", "save_prefixes",
           "load_prefixes"]

MAGIC = b"GGUFLLM-KVCACHE\n"
VERSION = 1
_HEAD = struct.Struct("<IQ")
_DIGEST = 32
_STATE_MAGIC = struct.pack("<I", 0xAF143CD8)  # llama.cpp's io_magic, first in a seq state
_TAIL_BYTES = 1 << 20  # tensor data hashed into the model fingerprint (the file's end)


@functools.cache
def llama_build() -> str:
    """The llama.cpp build: llama-cpp-python's version and a hash of the libllama it loaded."""
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    digest = hashlib.sha256(Path(lib._lib._name).read_bytes()).hexdigest()[:16]
    return f"llama-cpp-python {llama_cpp.__version__}, libllama {digest}"


def model_fingerprint(summary: GGUFSummary) -> str:
    """sha256 of a GGUF's header (metadata and tensor layout) and its last MiB of data.

    Args:
        summary: the checked header of the file.
    """
    data_start = min((t.offset for t in summary.tensors), default=summary.file_size)
    h = hashlib.sha256()
    with open(summary.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        h.update(mm[:data_start])
        h.update(mm[max(data_start, summary.file_size - _TAIL_BYTES):])
    return h.hexdigest()


@dataclass(frozen=True)
class KVCacheIdentity:
    """What saved sequence state is valid for; two must be equal to reuse a file.

    Attributes:
        model_size: the GGUF's size in bytes.
        model_digest: :func:`model_fingerprint` of the GGUF.
        llama_build: :func:`llama_build`.
        n_ctx: the context's cells (``llama_n_ctx``).
        n_seq: sequences (``n_seq_max``).
        kv_unified: one cell pool for every sequence.
        kv_type: type of K and V (``KV_CACHE_TYPE``).
        swa_full: full-size sliding-window cache.
        flash_attn: the flash-attention setting (it decides the V layout; None: auto).
    """

    model_size: int
    model_digest: str
    llama_build: str
    n_ctx: int
    n_seq: int
    kv_unified: bool
    kv_type: str
    swa_full: bool
    flash_attn: bool | None

    @classmethod
    def of(cls, summary: GGUFSummary, **context: Any) -> KVCacheIdentity:
        """The identity of a context over the model ``summary`` describes."""
        return cls(model_size=summary.file_size, model_digest=model_fingerprint(summary),
                   llama_build=llama_build(), **context)

    def differences(self, other: KVCacheIdentity) -> list[str]:
        """``field: ours != theirs`` for each field that differs."""
        return [f"{f.name}: file has {getattr(other, f.name)!r}, this model has "
                f"{getattr(self, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def save_prefixes(path: str | os.PathLike[str], entries: Iterable[CachedPrefix],
                  identity: KVCacheIdentity) -> int:
    """Writes every entry to ``path`` atomically (temporary file, fsync, rename).

    Returns:
        The file's size in bytes.

    Raises:
        OSError: the file could not be written (the old file, if any, is unchanged).
    """
    entries = list(entries)
    header = json.dumps({"identity": dataclasses.asdict(identity),
                         "entries": [[len(e.tokens), len(e.state)] for e in entries]}).encode()
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            def put(data: bytes | memoryview) -> None:
                digest.update(data)
                f.write(data)

            put(MAGIC)
            put(_HEAD.pack(VERSION, len(header)))
            put(header)
            for e in entries:
                put(e.tokens.astype("<i4", copy=False).tobytes())
                put(e.state)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return size


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_prefixes(path: str | os.PathLike[str],
                  identity: KVCacheIdentity) -> list[CachedPrefix]:
    """Reads and checks a file written by :func:`save_prefixes`.

    Raises:
        KVCacheMismatchError: the file was made for another model, llama.cpp build,
            context setting or file format.
        KVCacheError: the file is missing, unreadable, truncated or corrupt.
    """
    p = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KVCacheError(p, f"cannot read it: {exc.strerror or exc}") from None
    fixed = len(MAGIC) + _HEAD.size
    if not data:
        raise KVCacheError(p, "the file is empty")
    if not data.startswith(MAGIC) and not MAGIC.startswith(data):
        raise KVCacheError(p, "not a ggufllm KV-cache file")
    if len(data) < fixed + _DIGEST:
        raise KVCacheError(p, f"truncated ({len(data)} bytes)")
    version, n_header = _HEAD.unpack_from(data, len(MAGIC))
    if version != VERSION:
        raise KVCacheMismatchError(p, f"file format {version}; this ggufllm reads {VERSION}")
    if n_header > len(data) - fixed - _DIGEST:
        raise KVCacheError(p, f"truncated ({len(data)} bytes; its header alone needs more)")
    header = _parse_header(p, data[fixed:fixed + n_header])
    sizes = header["entries"]
    expected = fixed + n_header + sum(4 * n + s for n, s in sizes) + _DIGEST
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise KVCacheError(p, f"{what} ({len(data)} bytes, expected {expected})")
    if hashlib.sha256(memoryview(data)[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise KVCacheError(p, "checksum mismatch (the file is corrupt)")
    theirs = header["identity"]
    problems = identity.differences(theirs)
    if problems:
        raise KVCacheMismatchError(p, "made for another setting: " + "; ".join(problems))
    return _entries(p, data, fixed + n_header, sizes)


def _parse_header(path: str, raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
        identity = KVCacheIdentity(**header["identity"])
        sizes = [(int(n), int(s)) for n, s in header["entries"]]
    except (ValueError, TypeError, KeyError) as exc:
        raise KVCacheError(path, f"its header is not valid ({exc})") from None
    if any(n <= 0 or s <= len(_STATE_MAGIC) for n, s in sizes):
        raise KVCacheError(path, "its header lists an empty entry")
    return {"identity": identity, "entries": sizes}


def _entries(path: str, data: bytes, pos: int,
             sizes: list[tuple[int, int]]) -> list[CachedPrefix]:
    out = []
    for n_tokens, n_state in sizes:
        tokens = np.frombuffer(data, dtype="<i4", count=n_tokens, offset=pos).astype(np.int32)
        pos += 4 * n_tokens
        state = data[pos:pos + n_state]
        pos += n_state
        if not state.startswith(_STATE_MAGIC) or tokens.min() < 0:
            raise KVCacheError(path, "an entry is not llama.cpp sequence state")
        out.append(CachedPrefix(tokens, state))
    return out
