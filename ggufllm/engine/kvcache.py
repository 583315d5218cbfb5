"""The KV cache beyond one context: what it costs, one sequence's state as bytes, and a
host-RAM cache of prompt prefixes.

- :func:`kv_cache_bytes`: the bytes llama.cpp allocates for the K/V cache of a model in
  each cache mode (type, sliding-window mode, sequences), from the GGUF header alone.
- :func:`seq_state_get` / :func:`seq_state_set`: one sequence's KV cells as bytes
  (``llama_state_seq_get_data`` / ``set_data``).
- :func:`restore_is_exact`: when restoring saved state gives the same logits as the
  evaluation it replaces (measured; see the function).
- :class:`PrefixCache`: a bounded LRU of prefixes (tokens -> state) in host RAM, looked
  up by longest common prefix, like llama-server's ``--cache-ram``.

Saving and loading these prefixes to a file lives in :mod:`ggufllm.engine.kvfile`.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as lib
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..config import KVCacheType
from ..gguf_file import GGUFSummary

__all__ = [
    "KV_TYPES", "KVLayout", "KVBytes", "kv_cache_bytes", "seq_state_size", "seq_state_get",
    "seq_state_set",
    "restore_is_exact", "usable_prefix", "CachedPrefix", "PrefixCache", "PrefixCacheStats",
]

# KV_CACHE_TYPE -> the ggml type of both K and V
KV_TYPES: dict[str, GGMLQuantizationType] = {
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
}
# Architectures whose sliding-window layers follow a period when the GGUF carries no
# explicit per-layer pattern: llama.cpp's set_swa_pattern(n) makes layer il a window
# layer when il % n < n - 1 (gpt-oss: even layers; Gemma 3: five of every six).
SWA_PERIOD = {"gpt-oss": 2, "gemma3": 6}
_PAD = 256  # llama.cpp pads n_ctx, per-sequence contexts and window caches to 256 cells


def _pad(n: int) -> int:
    return -(-n // _PAD) * _PAD


def _row_bytes(ggml_type: GGMLQuantizationType, n: int) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    return n // block * size


@dataclass(frozen=True)
class KVLayout:
    """Per-layer K/V widths of a model and which layers attend to a sliding window.

    Attributes:
        n_embd_k: K values per token, per layer (``n_head_kv * key_length``).
        n_embd_v: V values per token, per layer.
        swa: True for the layers with a sliding window.
        n_swa: the window in tokens (0: none).
        head_k, head_v: K and V values per head.
    """

    n_embd_k: tuple[int, ...]
    n_embd_v: tuple[int, ...]
    swa: tuple[bool, ...]
    n_swa: int
    head_k: int
    head_v: int

    @classmethod
    def from_gguf(cls, summary: GGUFSummary) -> KVLayout:
        """Reads the layout from a checked GGUF header (the keys llama.cpp reads)."""
        meta, arch = summary.metadata, summary.architecture
        n_layer = int(meta[f"{arch}.block_count"])
        n_head = int(meta[f"{arch}.attention.head_count"])
        head_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
        head_dim = int(meta[f"{arch}.embedding_length"]) // n_head
        key_len = int(meta.get(f"{arch}.attention.key_length", head_dim))
        value_len = int(meta.get(f"{arch}.attention.value_length", head_dim))
        n_swa = int(meta.get(f"{arch}.attention.sliding_window", 0) or 0)
        period = int(meta.get(f"{arch}.attention.sliding_window_pattern",
                              SWA_PERIOD.get(arch, 0)))
        swa = tuple(n_swa > 0 and (period == 0 or il % period < period - 1)
                    for il in range(n_layer))
        return cls(n_embd_k=(int(head_kv) * key_len,) * n_layer,
                   n_embd_v=(int(head_kv) * value_len,) * n_layer, swa=swa, n_swa=n_swa,
                   head_k=key_len, head_v=value_len)

    @classmethod
    def gpt_oss_20b(cls) -> KVLayout:
        """openai/gpt-oss-20b's config: 24 layers, 8 KV heads x 64, even layers window 128."""
        return cls(n_embd_k=(512,) * 24, n_embd_v=(512,) * 24,
                   swa=tuple(il % 2 == 0 for il in range(24)), n_swa=128, head_k=64, head_v=64)

    def kv_type_problem(self, kv_type: KVCacheType) -> str | None:
        """Why llama.cpp would refuse this cache type for this model (None: it accepts it).

        A quantized cache stores each head in whole blocks of 32 values; llama.cpp
        refuses the context (NULL) when a head is not a multiple of the block.
        """
        block = GGML_QUANT_SIZES[KV_TYPES[kv_type]][0]
        if self.head_k % block or self.head_v % block:
            return (f"KV_CACHE_TYPE={kv_type} needs heads of a multiple of {block} values; "
                    f"this model's heads have {self.head_k} (K) and {self.head_v} (V)")
        return None

    def bytes_per_token(self, kv_type: KVCacheType = "f16", *, window: bool) -> int:
        """K+V bytes of one cached token over the full-attention (or window) layers."""
        t = KV_TYPES[kv_type]
        layers = zip(self.n_embd_k, self.n_embd_v, self.swa, strict=True)
        return sum(_row_bytes(t, k) + _row_bytes(t, v) for k, v, s in layers if s == window)


@dataclass(frozen=True)
class KVBytes:
    """What a KV cache costs: cells and bytes of the full-attention and window caches."""

    full_cells: int
    full_bytes: int
    swa_cells: int
    swa_bytes: int

    @property
    def total(self) -> int:
        return self.full_bytes + self.swa_bytes


def kv_cache_bytes(layout: KVLayout, *, n_ctx: int, n_seq: int = 1,
                   kv_type: KVCacheType = "f16", swa_full: bool = True, unified: bool = True,
                   n_ubatch: int = 512) -> KVBytes:
    """The bytes llama.cpp allocates for the KV cache (llama-kv-cache(-iswa).cpp's sizes).

    Args:
        layout: the model's K/V widths and window layers.
        n_ctx: the context asked for (the pool of every sequence together).
        n_seq: sequences (``n_seq_max``).
        kv_type: type of K and V.
        swa_full: True keeps a full-size window cache (prefixes can be cut back);
            False keeps ``n_swa`` cells per sequence plus one micro-batch.
        unified: one cell pool for every sequence (``kv_unified``).
        n_ubatch: the micro-batch size (part of a window-sized cache).

    Returns:
        Cells and bytes of both caches.
    """
    n_ctx = _pad(n_ctx)
    streams = 1 if unified else n_seq
    per_stream = n_ctx if unified else _pad(n_ctx // n_seq)
    if swa_full:
        swa_per_stream = per_stream
    else:
        swa_per_stream = _pad(min(per_stream, layout.n_swa * (n_seq if unified else 1) + n_ubatch))
    full_cells, swa_cells = per_stream * streams, swa_per_stream * streams
    has_swa = any(layout.swa)
    return KVBytes(full_cells, full_cells * layout.bytes_per_token(kv_type, window=False),
                   swa_cells if has_swa else 0,
                   swa_cells * layout.bytes_per_token(kv_type, window=True))


# -- one sequence's state ------------------------------------------------------------


def seq_state_size(ctx: lib.llama_context_p, seq_id: int) -> int:
    """Bytes :func:`seq_state_get` would copy (llama.cpp measures without copying)."""
    return int(lib.llama_state_seq_get_size(ctx, seq_id))


def seq_state_get(ctx: lib.llama_context_p, seq_id: int, size: int | None = None) -> bytearray:
    """Copies the KV cells of sequence ``seq_id`` out of the context, once: the buffer
    llama.cpp writes is the one returned.

    Args:
        size: :func:`seq_state_size`, when the caller has it already.

    Raises:
        RuntimeError: llama.cpp could not write the state (it logs why).
    """
    if size is None:
        size = seq_state_size(ctx, seq_id)
    buf = bytearray(size)
    dst = (ctypes.c_uint8 * size).from_buffer(buf)
    written = lib.llama_state_seq_get_data(ctx, dst, size, seq_id)
    del dst  # release the export of ``buf`` before handing it on
    if size == 0 or written != size:
        raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
    return buf


def seq_state_set(ctx: lib.llama_context_p, seq_id: int, state: bytes | bytearray,
                  n_tokens: int) -> bool:
    """Puts saved state into sequence ``seq_id`` (replacing what it held).

    The restored sequence must end at position ``n_tokens - 1``; anything else (a state
    from other tokens) is removed again. On failure the sequence is left empty.

    Returns:
        True if the sequence now holds exactly those ``n_tokens`` positions.
    """
    mem = lib.llama_get_memory(ctx)
    # pointers into the caller's buffer, not copies of it
    src: Any
    if isinstance(state, bytearray):
        src = (ctypes.c_uint8 * len(state)).from_buffer(state)
    else:
        src = ctypes.cast(ctypes.c_char_p(state), ctypes.POINTER(ctypes.c_uint8))
    # returns 0 on failure (a short or inconsistent buffer: llama.cpp logs why)
    read = lib.llama_state_seq_set_data(ctx, src, len(state), seq_id)
    del src
    if read == len(state) and lib.llama_memory_seq_pos_max(mem, seq_id) == n_tokens - 1:
        return True
    lib.llama_memory_seq_rm(mem, seq_id, -1, -1)
    return False


def restore_is_exact(n_tokens: int, *, n_swa: int, flash_attn: bool | None) -> bool:
    """Whether restoring a saved sequence of ``n_tokens`` gives bit-identical logits to
    the cache it was saved from (measured: ``benchmarks/kv_layout.py``; held where the
    policy allows it by ``tests/test_kvcache.py``).

    A saved sequence leaves out the cells its sliding window masks, so past the window
    the restored window cells sit at other cell indices than before. Their values are
    the same, but llama.cpp's CPU flash-attention kernel splits the cells of a one-token
    decode into one chunk per thread (from 512 cells on) and adds each chunk apart: moved
    cells are summed in another grouping. Measured: logits off by up to ~1 on Gemma 3
    270M (greedy tokens change), and on the tiny gpt-oss fixture when its window
    straddles a chunk border. Without flash attention, or with no window, or with
    nothing masked yet (``n_tokens <= n_swa``), every measured restore was bit-identical.

    Args:
        n_tokens: tokens in the saved sequence.
        n_swa: the model's sliding window (0: none).
        flash_attn: the context's setting; None (llama.cpp decides, and on CPU it turns
            flash attention on) counts as on.
    """
    return n_swa == 0 or n_tokens <= n_swa or flash_attn is False


def usable_prefix(n_entry: int, n_common: int, n_swa: int) -> int:
    """How many tokens of a restored entry of ``n_entry`` tokens a prompt can keep when
    they share ``n_common`` tokens (0: restoring it does not help).

    A restored sliding-window sequence longer than the window holds only its last
    ``n_swa`` window cells, so it is only of use whole: the window check before reuse
    (llama-server's, the scheduler's) wants ``pos_min <= n_keep - n_swa``.
    """
    if n_swa == 0 or n_entry <= n_swa or n_common >= n_entry:
        return n_common
    return 0


# -- the RAM cache -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CachedPrefix:
    """A prompt prefix and its sequence state.

    Attributes:
        tokens: the prefix (int32).
        state: ``llama_state_seq_get_data`` of a sequence holding exactly ``tokens``
            (a bytearray when it was copied out of a context; never changed).
    """

    tokens: np.ndarray
    state: bytes | bytearray

    @property
    def n_bytes(self) -> int:
        return len(self.state) + self.tokens.nbytes


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters of a :class:`PrefixCache`."""

    entries: int
    bytes: int
    budget: int
    hits: int
    misses: int
    evictions: int
    refused: int  # puts not kept: restore not exact, or bigger than the budget


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(tokens, dtype=np.int32)


class PrefixCache:
    """A bounded LRU of prompt prefixes and their KV state, in host RAM.

    Thread-safe. Only entries whose restore is exact (:func:`restore_is_exact`) are
    kept, so that a hit never changes an answer; an entry bigger than the whole budget
    is not kept either; putting a prefix already held replaces it.

    Args:
        budget_bytes: most bytes of state and tokens held (``KV_CACHE_RAM_MB``; 0 keeps
            nothing).
        n_swa: the model's sliding window (0: none).
        flash_attn: the context's flash-attention setting (None: llama.cpp decides).
        page: a lookup keeps a multiple of this many tokens (the scheduler evaluates
            prompts in pages and reuses whole pages only).
    """

    def __init__(self, budget_bytes: int, *, n_swa: int = 0, flash_attn: bool | None = None,
                 page: int = 1) -> None:
        self.budget = budget_bytes
        self.n_swa = n_swa
        self.flash_attn = flash_attn
        self.page = page
        self._entries: OrderedDict[bytes, CachedPrefix] = OrderedDict()  # oldest first
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._refused = 0
        self._lock = threading.Lock()

    def accepts(self, n_tokens: int) -> bool:
        """Whether a prefix of ``n_tokens`` would be kept (its restore is exact)."""
        return n_tokens > 0 and restore_is_exact(n_tokens, n_swa=self.n_swa,
                                                 flash_attn=self.flash_attn)

    def fits(self, n_tokens: int, n_state: int) -> bool:
        """Whether a prefix of ``n_tokens`` with ``n_state`` bytes of state would be kept
        (asked before the state is copied out of the context)."""
        return self.accepts(n_tokens) and 4 * n_tokens + n_state <= self.budget

    def holds(self, tokens: Sequence[int] | np.ndarray) -> bool:
        """Whether an entry for exactly ``tokens`` is held."""
        with self._lock:
            return as_tokens(tokens).tobytes() in self._entries

    def put(self, tokens: Sequence[int] | np.ndarray, state: bytes | bytearray) -> bool:
        """Keeps ``state`` for ``tokens``, evicting the least recently used entries.

        Returns:
            False if nothing was kept: the restore would not be exact, or the entry
            alone exceeds the budget.
        """
        entry = CachedPrefix(as_tokens(tokens), state)
        if entry.n_bytes > self.budget or not self.accepts(len(entry.tokens)):
            with self._lock:
                self._refused += 1
            return False
        key = entry.tokens.tobytes()
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.n_bytes
            while self._entries and self._bytes + entry.n_bytes > self.budget:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= gone.n_bytes
                self._evictions += 1
            self._entries[key] = entry
            self._bytes += entry.n_bytes
        return True

    def lookup(self, tokens: Sequence[int] | np.ndarray,
               min_tokens: int = 1) -> tuple[CachedPrefix, int] | None:
        """The entry sharing the longest usable prefix with ``tokens``.

        Args:
            tokens: the new prompt.
            min_tokens: fewer usable tokens than this count as a miss (the caller
                passes what its slot already holds, so that only a gain is a hit).

        Returns:
            ``(entry, n_keep)``: restore ``entry`` and keep its first ``n_keep`` tokens
            (at most ``len(tokens) - 1``, a multiple of ``page``); or None (a miss).
        """
        prompt = as_tokens(tokens)
        limit = len(prompt) - 1  # the last prompt token is evaluated for its logits
        with self._lock:
            best: tuple[CachedPrefix, int] | None = None
            for entry in self._entries.values():
                n_common = min(common_prefix(entry.tokens, prompt), limit)
                n_common -= n_common % self.page
                n_keep = usable_prefix(len(entry.tokens), n_common, self.n_swa)
                if n_keep >= max(min_tokens, 1) and (best is None or n_keep > best[1]):
                    best = (entry, n_keep)
            if best is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(best[0].tokens.tobytes())
            return best

    def entries(self) -> list[CachedPrefix]:
        """Every entry, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(len(self._entries), self._bytes, self.budget,
                                    self._hits, self._misses, self._evictions, self._refused)

    def __len__(self) -> int:
        return len(self._entries)
