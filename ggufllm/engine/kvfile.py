"""Saved KV caches: one file holding every cached prefix (tokens and sequence state),
stamped with what the state is valid for and signed by the user whose ggufllm wrote it.

Layout (little-endian)::

    b"GGUFLLM-KVCACHE\\n"                 16 bytes
    u32 format version (3), u64 header length
    header: JSON {"identity": {...},
                  "entries": [[n_tokens, n_state_bytes, [[position, n_bytes], ...]], ...]}
    per entry: n_tokens int32 tokens, n_state_bytes of llama_state_seq_get_data, then
               each window checkpoint's bytes (see kvcache.CachedPrefix)
    sha256 of everything above           32 bytes
    HMAC-SHA256 of the same bytes        32 bytes, under this user's key (:mod:`.kvkey`)

The sha256 finds damage; anyone can recompute it. The HMAC finds files that this user's
ggufllm did not write: it covers the header, which fixes where each entry's tokens end and
its state begins, and every token and state byte, so no entry's tokens can be paired with
other state (another document's) without the key. A file signed with another key
(another machine or account) is refused with :class:`KVCacheUntrustedError` unless the
caller trusts it (``trusted=True``); the other checks apply to every file.

Writing goes to a private temporary file (mode 0600, a unique name in the target's
folder), fsynced and renamed: a crash or a concurrent save leaves one whole file, never
a mix. Reading checks the length, the header and the identity, then streams the file
once through both digests, keeping only the entries the caller chose (the rest are
hashed and dropped), and compares the digests before any byte reaches llama.cpp.
Another model, llama.cpp build, context setting or file format raises
:class:`KVCacheMismatchError`; a truncated, damaged or garbage file :class:`KVCacheError`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import KVCacheError, KVCacheMismatchError, KVCacheUntrustedError
from ..gguf_file import GGUFSummary
from .kvcache import CachedPrefix
from .kvkey import key_path, user_key

__all__ = ["KVCacheIdentity", "KVFileContents", "model_fingerprint", "llama_build",
           "save_prefixes", "read_prefixes", "load_prefixes"]

MAGIC = b"GGUFLLM-KVCACHE\n"
VERSION = 3  # 1: no HMAC (ggufllm before issue 15); 2: no window checkpoints
_HEAD = struct.Struct("<IQ")
_FIXED = len(MAGIC) + _HEAD.size
_DIGEST = 32
_TRAILER = 2 * _DIGEST  # sha256, HMAC-SHA256
_MAX_HEADER = 16 << 20  # ~1M entries; ggufllm never writes a longer header
_CHUNK = 1 << 20  # entries not kept are hashed this much at a time
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
    with (open(summary.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm,
          memoryview(mm) as view):
        h.update(view[:data_start])  # slices of the view: hashed in place, not copied
        h.update(view[max(data_start, summary.file_size - _TAIL_BYTES):])
    return h.hexdigest()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


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
        kv_reuse: ``KV_REUSE`` (a ``fast`` file holds prefixes an ``exact`` engine must
            not restore: generated tokens, cuts at any token).
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
    kv_reuse: str = "fast"

    @classmethod
    def of(cls, summary: GGUFSummary, **context: Any) -> KVCacheIdentity:
        """The identity of a context over the model ``summary`` describes."""
        return cls(model_size=summary.file_size, model_digest=model_fingerprint(summary),
                   llama_build=llama_build(), **context)

    def differences(self, other: KVCacheIdentity) -> list[str]:
        """``field: ours != theirs`` for each field that differs."""
        return [f"{f.name}: file has {_short(getattr(other, f.name))}, this model has "
                f"{_short(getattr(self, f.name))}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


# -- writing -------------------------------------------------------------------------


def save_prefixes(path: str | os.PathLike[str], entries: Iterable[CachedPrefix],
                  identity: KVCacheIdentity) -> int:
    """Writes every entry to ``path`` atomically and signs it with this user's key.

    The file is written to a unique temporary file (mode 0600) beside ``path``, fsynced
    and renamed over it: the result is always mode 0600 (the tokens are the user's
    documents), and two saves to one path at once leave one of the two whole files.

    Returns:
        The file's size in bytes.

    Raises:
        OSError: the file (or the key, on first use) could not be written; the old
            file, if any, is unchanged.
    """
    entries = list(entries)
    key = user_key()
    header = json.dumps({"identity": dataclasses.asdict(identity), "entries": [
        [len(e.tokens), len(e.state), [[p, len(c)] for p, c in e.checkpoints]]
        for e in entries]}).encode()
    target = Path(path)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(name)
    digest, mac = hashlib.sha256(), hmac.new(key, digestmod=hashlib.sha256)
    try:
        with os.fdopen(fd, "wb") as f:
            def put(data: bytes | bytearray) -> None:
                digest.update(data)
                mac.update(data)
                f.write(data)

            put(MAGIC)
            put(_HEAD.pack(VERSION, len(header)))
            put(header)
            for e in entries:
                put(e.tokens.astype("<i4", copy=False).tobytes())
                put(e.state)
                for _, window in e.checkpoints:
                    put(window)
            f.write(digest.digest())
            f.write(mac.digest())
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


# -- reading -------------------------------------------------------------------------

# given every entry's (n_tokens, n_state_bytes including its checkpoints), oldest first:
# the indexes to keep
Chooser = Callable[[Sequence[tuple[int, int]]], Collection[int]]
# an entry's layout in a file: n_tokens, n_state_bytes, [(checkpoint position, n_bytes)]
_Layout = tuple[int, int, list[tuple[int, int]]]


@dataclass(frozen=True)
class KVFileContents:
    """What :func:`read_prefixes` kept of a file.

    Attributes:
        entries: the entries chosen, in the file's order (least recently used first).
        n_entries: how many entries the file holds.
    """

    entries: list[CachedPrefix]
    n_entries: int


def load_prefixes(path: str | os.PathLike[str], identity: KVCacheIdentity, *,
                  trusted: bool = False) -> list[CachedPrefix]:
    """Every entry of a file written by :func:`save_prefixes` (see :func:`read_prefixes`)."""
    return read_prefixes(path, identity, trusted=trusted).entries


def read_prefixes(path: str | os.PathLike[str], identity: KVCacheIdentity, *,
                  trusted: bool = False, choose: Chooser | None = None) -> KVFileContents:
    """Reads and checks a file written by :func:`save_prefixes`.

    The file is read once; only the entries chosen are held in memory.

    Args:
        path: the file.
        identity: what this context's state is; the file's must be equal.
        trusted: accept a file signed with another key (another machine or account);
            it must still be whole and made for this identity.
        choose: picks the entries to keep from their sizes (None: all).

    Raises:
        KVCacheMismatchError: the file was made for another model, llama.cpp build,
            context setting or file format.
        KVCacheUntrustedError: the file was not signed with this user's key and
            ``trusted`` is False.
        KVCacheError: the file is missing, unreadable, truncated or corrupt.
    """
    p = str(path)
    try:
        with open(p, "rb") as f:
            return _read(p, f, identity, trusted, choose)
    except OSError as exc:
        raise KVCacheError(p, f"cannot read it: {exc.strerror or exc}") from None


class _Stream:
    """Reads a file through its sha256 and (unless trusted) its HMAC."""

    def __init__(self, path: str, f: IO[bytes], key: bytes | None) -> None:
        self.path, self.f = path, f
        self.digest = hashlib.sha256()
        self.mac = hmac.new(key, digestmod=hashlib.sha256) if key is not None else None

    def feed(self, data: bytes | memoryview) -> None:
        self.digest.update(data)
        if self.mac is not None:
            self.mac.update(data)

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise KVCacheError(self.path, "truncated while it was read (the file changed)")
        self.feed(data)
        return data

    def skip(self, n: int) -> None:
        buf = bytearray(min(n, _CHUNK))
        with memoryview(buf) as view:
            while n:
                got = self.f.readinto(view[:min(n, len(buf))])
                if not got:
                    raise KVCacheError(self.path, "truncated while it was read (the file changed)")
                self.feed(view[:got])
                n -= got


def _read(p: str, f: IO[bytes], identity: KVCacheIdentity, trusted: bool,
          choose: Chooser | None) -> KVFileContents:
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise KVCacheError(p, "the file is empty")
    start = f.read(_FIXED)
    if start[:len(MAGIC)] != MAGIC[:len(start)]:
        raise KVCacheError(p, "not a ggufllm KV-cache file")
    if size < _FIXED + _TRAILER:
        raise KVCacheError(p, f"truncated ({size} bytes)")
    version, n_header = _HEAD.unpack_from(start, len(MAGIC))
    if version != VERSION:
        how = ("written by an older ggufllm: save it again" if version < VERSION
               else "written by a newer ggufllm")
        raise KVCacheMismatchError(p, f"file format {version}; this ggufllm reads format "
                                      f"{VERSION} ({how})")
    if n_header > size - _FIXED - _TRAILER:
        raise KVCacheError(p, f"truncated ({size} bytes; its header alone needs more)")
    if n_header > _MAX_HEADER:
        raise KVCacheError(p, f"its header is not valid ({n_header} bytes, more than "
                              f"ggufllm writes)")
    raw = f.read(n_header)
    theirs, layouts = _parse_header(p, raw)
    sizes = [(n, s + sum(c for _, c in cps)) for n, s, cps in layouts]
    expected = _FIXED + n_header + sum(4 * n + s for n, s in sizes) + _TRAILER
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise KVCacheError(p, f"{what} ({size} bytes, expected {expected})")
    problems = identity.differences(theirs)
    if problems:
        raise KVCacheMismatchError(p, "made for another setting: " + "; ".join(problems))
    stream = _Stream(p, f, None if trusted else _key(p))
    stream.feed(start)
    stream.feed(raw)
    chosen = set(range(len(sizes)) if choose is None else choose(sizes))
    kept = []
    for i, (n_tokens, n_state, cps) in enumerate(layouts):
        if i in chosen:
            kept.append((stream.take(4 * n_tokens), stream.take(n_state),
                         tuple((pos, stream.take(n)) for pos, n in cps)))
        else:
            stream.skip(sizes[i][1] + 4 * n_tokens)
    trailer = f.read(_TRAILER + 1)
    if len(trailer) != _TRAILER:
        raise KVCacheError(p, "its length changed while it was read")
    if not hmac.compare_digest(stream.digest.digest(), trailer[:_DIGEST]):
        raise KVCacheError(p, "checksum mismatch (the file is corrupt)")
    if stream.mac is not None and not hmac.compare_digest(stream.mac.digest(), trailer[_DIGEST:]):
        raise KVCacheUntrustedError(p, str(key_path()))
    return KVFileContents([_entry(p, t, s, c) for t, s, c in kept], len(sizes))


def _key(path: str) -> bytes:
    try:
        return user_key()
    except OSError as exc:
        raise KVCacheError(path, f"cannot read the key that signs KV-cache files: {exc}") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("a key appears twice")
    return dict(pairs)


def _is_int(v: Any) -> bool:
    return type(v) is int


def _parse_header(path: str, raw: bytes) -> tuple[KVCacheIdentity, list[_Layout]]:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant,
                            object_pairs_hook=_unique_keys)
        if not isinstance(header, dict) or set(header) != {"identity", "entries"}:
            raise ValueError("not an object of identity and entries")
        entries, ident = header["entries"], header["identity"]
        if not isinstance(entries, list) or not all(
                isinstance(e, list) and len(e) == 3 and _is_int(e[0]) and _is_int(e[1])
                and isinstance(e[2], list) and all(
                    isinstance(c, list) and len(c) == 2 and all(map(_is_int, c)) for c in e[2])
                for e in entries):
            raise ValueError("entries are not [n_tokens, n_state, checkpoints]")
        if not isinstance(ident, dict):
            raise ValueError("the identity is not an object")
        identity = KVCacheIdentity(**ident)
    except (ValueError, TypeError, RecursionError) as exc:
        raise KVCacheError(path, f"its header is not valid ({_short(str(exc))})") from None
    layouts = [(n, s, [(pos, c) for pos, c in cps]) for n, s, cps in entries]
    for n, s, cps in layouts:
        if n <= 0 or s <= len(_STATE_MAGIC):
            raise KVCacheError(path, "its header lists an empty entry")
        positions = [pos for pos, _ in cps]
        if (any(not 0 < pos < n or c <= len(_STATE_MAGIC) for pos, c in cps)
                or positions != sorted(set(positions))):
            raise KVCacheError(path, "its header lists a checkpoint outside its entry")
    return identity, layouts


def _entry(path: str, tokens: bytes, state: bytes,
           checkpoints: tuple[tuple[int, bytes], ...]) -> CachedPrefix:
    ids = np.frombuffer(tokens, dtype="<i4").astype(np.int32)
    if (not state.startswith(_STATE_MAGIC) or ids.min() < 0
            or not all(c.startswith(_STATE_MAGIC) for _, c in checkpoints)):
        raise KVCacheError(path, "an entry is not llama.cpp sequence state")
    return CachedPrefix(ids, state, checkpoints)
