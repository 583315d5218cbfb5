"""A bounds-checked GGUF header reader.

llama.cpp trusts the header of a GGUF file; a truncated or crafted file can make
it allocate absurd sizes or read past the end. We read the whole header in
Python first, check every count, length, dimension, type id and tensor extent
against the file, and only hand a file that passed to llama.cpp.

The same pass gives ``ggufllm info`` its summary.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelLoadError
from .gguf_checks import TokenTable, hparam_problems, vocab_problems
from .gguf_probe import probe_enabled, probe_model_file

__all__ = ["GGUFSummary", "TensorInfo", "read_gguf_header", "tensor_array"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Far above any real model (gpt-oss-20b has 459 tensors, ~40 keys) yet small
# enough that a crafted count cannot make us loop for minutes.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
# Strings longer than this are not kept in the summary (token lists, templates
# are kept; a 1 GB "string" is not).
MAX_KEPT_STRING = 1 << 20
# Numeric arrays up to this length (per-layer hyper-parameters) are kept as values.
MAX_KEPT_ARRAY = 4096
TOKENS_KEY, TOKEN_TYPE_KEY = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"

# value type id -> (struct format, size); 8 = string, 9 = array
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4),
    5: ("<i", 4), 6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8),
    12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int  # absolute offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFSummary:
    """What the header says: metadata (scalars, strings, array lengths) and tensors."""

    path: Path
    version: int
    file_size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    array_values: dict[str, np.ndarray] = field(default_factory=dict)  # short numeric arrays
    tensors: list[TensorInfo] = field(default_factory=list)
    # the bytes of each token's text as llama.cpp reads it (up to a NUL), when the file has
    # tokens: an upper bound of the text the token decodes to (see NativeModel.max_token_bytes)
    token_bytes: np.ndarray | None = None

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if value is not None else None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.metadata.get("tokenizer.chat_template"))

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def type_table(self) -> list[tuple[str, int, int]]:
        """(type name, tensor count, bytes), largest first."""
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for t in self.tensors:
            counts[t.ggml_type.name] += 1
            sizes[t.ggml_type.name] += t.n_bytes
        return sorted(((k, counts[k], sizes[k]) for k in counts), key=lambda r: -r[2])


class _Cursor:
    """Reads little-endian values from a buffer, raising _Bad past its end."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Bad(f"{what} at byte {self.pos} runs past the end of the file "
                       f"({len(self.buf)} bytes)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", 8, what))

    def string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        return bytes(self.take(n, what))


class _Bad(Exception):
    pass


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALARS:
        fmt, size = _SCALARS[vtype]
        return cur.scalar(fmt, size, f"value of {key}")
    if vtype == _STRING:
        n = cur.u64(f"length of {key}")
        raw = cur.take(n, f"value of {key}")
        return bytes(raw).decode("utf-8", "replace") if n <= MAX_KEPT_STRING else None
    raise _Bad(f"key {key!r} has unknown value type {vtype}")


def _read_array(cur: _Cursor, key: str, keep: dict[str, Any]) -> int:
    """Skips an array value after checking it fits; returns its length.

    Short numeric arrays, the token types and the token strings land in ``keep``.
    """
    etype = cur.u32(f"array type of {key}")
    count = cur.u64(f"array length of {key}")
    remaining = len(cur.buf) - cur.pos
    if etype in _SCALARS:
        size = _SCALARS[etype][1]
        if count > remaining // size:
            raise _Bad(f"array {key!r} claims {count} items, more than the file holds")
        raw = cur.take(count * size, f"array {key}")
        if count <= MAX_KEPT_ARRAY or key == TOKEN_TYPE_KEY:
            keep[key] = np.frombuffer(raw, dtype=_NUMPY[etype]).copy()
    elif etype == _STRING:
        if count > remaining // 8:
            raise _Bad(f"array {key!r} claims {count} strings, more than the file holds")
        starts: list[int] | None = [] if key == TOKENS_KEY else None
        cur.pos = _skip_strings(cur.buf, cur.pos, count, key, starts)
        if starts is not None:
            keep[key] = _token_table(cur.buf, starts, cur.pos)
    else:
        raise _Bad(f"array {key!r} has unsupported item type {etype}")
    return count


_U64 = struct.Struct("<Q")


def _skip_strings(buf: memoryview, pos: int, count: int, key: str,
                  starts: list[int] | None = None) -> int:
    """Walks ``count`` length-prefixed strings (token lists: the hot loop of the check).

    With ``starts``, each string's offset (of its length prefix) is appended to it.
    """
    end = len(buf)
    unpack = _U64.unpack_from
    if starts is None:
        for _ in range(count):
            if pos + 8 > end:
                raise _Bad(f"array {key!r} runs past the end of the file")
            pos += 8 + unpack(buf, pos)[0]
    else:
        append = starts.append
        for _ in range(count):
            if pos + 8 > end:
                raise _Bad(f"array {key!r} runs past the end of the file")
            append(pos)
            pos += 8 + unpack(buf, pos)[0]
    if pos > end:
        raise _Bad(f"array {key!r} runs past the end of the file")
    return pos


def _token_table(buf: memoryview, starts: list[int], end: int) -> TokenTable:
    first = starts[0] if starts else end  # an empty list: an empty table
    offsets = np.array(starts, dtype=np.int64) - first
    lengths = np.diff(np.append(offsets, end - first)) - 8
    data = np.frombuffer(buf[first:end], dtype=np.uint8).copy()
    text = offsets + 8
    # llama.cpp reads each token as a C string: it ends at its first NUL byte
    data[(offsets[:, None] + np.arange(8)).ravel()] = 1  # hide the length prefixes
    nul = np.flatnonzero(data == 0)
    if len(nul):
        owner = np.searchsorted(text, nul, side="right") - 1
        cut = np.full(len(lengths), np.iinfo(np.int64).max)
        np.minimum.at(cut, owner, nul - text[owner])
        lengths = np.minimum(lengths, cut)
    return TokenTable(data, text, lengths)


def _read_tensor_info(cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string(f"name of tensor {index}").decode("utf-8", "replace")
    n_dims = cur.u32(f"dims of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _Bad(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
    shape = tuple(cur.u64(f"shape of tensor {name!r}") for _ in range(n_dims))
    type_id = cur.u32(f"type of tensor {name!r}")
    offset = cur.u64(f"offset of tensor {name!r}")
    return name, shape, type_id, offset


def _tensor_bytes(name: str, shape: tuple[int, ...], type_id: int) -> tuple[GGMLQuantizationType, int]:
    try:
        qtype = GGMLQuantizationType(type_id)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Bad(f"tensor {name!r} has unknown type id {type_id}") from None
    n = 1
    for d in shape:
        if d <= 0:
            raise _Bad(f"tensor {name!r} has a non-positive dimension in {shape}")
        n *= d
        if n > 1 << 50:  # no real tensor has 10^15 elements
            raise _Bad(f"tensor {name!r} has an absurd shape {shape}")
    if shape[0] % block:
        raise _Bad(f"tensor {name!r}: row of {shape[0]} is not a multiple of the "
                   f"{qtype.name} block size {block}")
    return qtype, n // block * type_size


def _parse(buf: memoryview, path: Path) -> tuple[GGUFSummary, dict[str, Any], int]:
    """(summary, the token table and arrays the semantic checks read, the header's length)."""
    cur = _Cursor(buf)
    if bytes(cur.take(4, "magic")) != GGUF_MAGIC:
        raise _Bad("not a GGUF file (bad magic)")
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise _Bad(f"unsupported GGUF version {version}")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise _Bad(f"absurd counts: {n_tensors} tensors, {n_kv} metadata keys")
    summary = GGUFSummary(path=path, version=version, file_size=len(buf))
    kept: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}").decode("utf-8", "replace")
        vtype = cur.u32(f"type of {key}")
        if key in summary.metadata or key in summary.array_lengths:
            raise _Bad(f"duplicate metadata key {key!r}")
        if vtype == _ARRAY:
            summary.array_lengths[key] = _read_array(cur, key, kept)
        else:
            summary.metadata[key] = _read_value(cur, vtype, key)
    alignment = summary.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Bad(f"general.alignment {alignment!r} is not a power of two")
    raw = [_read_tensor_info(cur, i) for i in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    seen: set[str] = set()
    for name, shape, type_id, rel in raw:
        if name in seen:
            raise _Bad(f"duplicate tensor name {name!r}")
        seen.add(name)
        qtype, n_bytes = _tensor_bytes(name, shape, type_id)
        if rel % alignment:
            raise _Bad(f"tensor {name!r} offset {rel} is not aligned to {alignment}")
        start = data_start + rel
        if start + n_bytes > len(buf):
            raise _Bad(f"tensor {name!r} data ({n_bytes} bytes at {start}) runs past "
                       f"the end of the file ({len(buf)} bytes)")
        summary.tensors.append(TensorInfo(name, shape, qtype, start, n_bytes))
    summary.array_values = {k: v for k, v in kept.items()
                            if isinstance(v, np.ndarray) and len(v) <= MAX_KEPT_ARRAY}
    if isinstance(tokens := kept.get(TOKENS_KEY), TokenTable):
        summary.token_bytes = tokens.lengths.astype(np.int32)
    return summary, kept, cur.pos


def _semantic_problems(summary: GGUFSummary, kept: dict[str, Any]) -> list[str]:
    types = kept.get(TOKEN_TYPE_KEY)
    types = types if isinstance(types, np.ndarray) and types.dtype.kind == "i" else None
    return (hparam_problems(summary.metadata, summary.array_values)
            + vocab_problems(summary.metadata, kept.get(TOKENS_KEY), types))


# Headers that passed, by path and file size: (header length, its hash, the summary). A
# parse depends only on the header's bytes and the file's size, and one load reads the header
# two or three times (the CLI's checks, the engine, the kernel self-test): ~0.2 s each for a
# 262k-token vocabulary, against ~5 ms to hash the header and find it unchanged.
_PASSED: OrderedDict[tuple[str, int], tuple[int, bytes, GGUFSummary]] = OrderedDict()
_PASSED_MAX = 8
_PASSED_LOCK = threading.Lock()


def _parse_once(view: memoryview, p: Path) -> GGUFSummary:
    """The summary of the file in ``view``: the last one's when its header hashes the same."""
    key = (str(p), len(view))
    with _PASSED_LOCK:
        known = _PASSED.get(key)
    if known is not None:
        end, digest, summary = known
        if hashlib.blake2b(view[:end]).digest() == digest:
            return summary
    summary, kept, end = _parse(view, p)
    problems = _semantic_problems(summary, kept)
    if problems:
        raise ModelLoadError(str(p), problems)
    digest = hashlib.blake2b(view[:end]).digest()
    with _PASSED_LOCK:
        _PASSED[key] = (end, digest, summary)
        _PASSED.move_to_end(key)
        while len(_PASSED) > _PASSED_MAX:
            _PASSED.popitem(last=False)
    return summary


def read_gguf_header(path: str | os.PathLike[str], *, probe: bool | None = None) -> GGUFSummary:
    """Reads and checks a GGUF file's header, tensor extents and the values llama.cpp
    would abort on.

    Args:
        path: the ``.gguf`` file.
        probe: also run the one-time probe load in a child process
            (:mod:`ggufllm.gguf_probe`); None follows ``GGUFLLM_PROBE`` (on by default).

    Returns:
        The header summary.

    Raises:
        ModelLoadError: the file is not a GGUF llama.cpp can safely open.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size == 0:
            raise _Bad("the file is empty")
        with p.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                summary = _parse_once(view, p)
            finally:
                view.release()
    except _Bad as exc:
        raise ModelLoadError(str(p), [str(exc)]) from None
    except OSError as exc:
        raise ModelLoadError(str(p), [f"cannot read the file: {exc.strerror or exc}"]) from None
    if probe_enabled() if probe is None else probe:
        probe_model_file(p)
    return summary


def tensor_array(summary: GGUFSummary, info: TensorInfo) -> np.ndarray:
    """One tensor's stored data, memory-mapped, in numpy order (last axis = row).

    F32/F16 come back as floats; every other type as the row's encoded bytes.
    """
    shape = tuple(reversed(info.shape))
    if info.ggml_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        dtype = np.float32 if info.ggml_type is GGMLQuantizationType.F32 else np.float16
        return np.memmap(summary.path, dtype=dtype, mode="r", offset=info.offset, shape=shape)
    block, size = GGML_QUANT_SIZES[info.ggml_type]
    byte_shape = (*shape[:-1], shape[-1] // block * size)
    return np.memmap(summary.path, dtype=np.uint8, mode="r", offset=info.offset, shape=byte_shape)
