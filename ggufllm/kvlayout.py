"""The KV cache's arithmetic, from a GGUF header alone: one place for the engine
(``get_model_info()["kv_cache"]``, the cache-type check) and the memory estimate
(:mod:`ggufllm.gpu.estimate`).

- :class:`KVLayout`: per-layer K/V widths and which layers attend to a sliding window;
- :func:`kv_cells`: the cells llama.cpp gives the full-attention and window caches
  (``llama-context.cpp``, ``llama-kv-cache-iswa.cpp``);
- :func:`kv_cache_bytes`: what those cells cost, for a cache type of :data:`KV_TYPES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .gguf_file import GGUFSummary

__all__ = ["KV_TYPES", "SWA_PERIOD", "KVLayout", "KVBytes", "kv_cells", "kv_cache_bytes"]

# a KV cache type's name (KV_CACHE_TYPE, llama.cpp's --cache-type-k) -> its ggml type
KV_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1,
    "q5_0": GGMLQuantizationType.Q5_0, "q5_1": GGMLQuantizationType.Q5_1,
}
# Architectures whose sliding-window layers follow a period when the GGUF carries no
# explicit per-layer pattern: llama.cpp's set_swa_pattern(n) makes layer il a window
# layer when il % n < n - 1 (gpt-oss: even layers; Gemma 3: five of every six).
# Another architecture with a window and no pattern: every layer is windowed.
SWA_PERIOD = {"gpt-oss": 2, "gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4}
_PAD = 256  # llama.cpp pads n_ctx, per-sequence contexts and window caches to 256 cells


def _pad(n: int) -> int:
    return -(-n // _PAD) * _PAD


def _row_bytes(ggml_type: GGMLQuantizationType, n: int) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    return n // block * size


def _per_layer(value: Any, n_layer: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value or 0)] * n_layer


def _window_layers(meta: dict[str, Any], arch: str, n_layer: int, n_swa: int) -> tuple[bool, ...]:
    if n_swa <= 0:
        return (False,) * n_layer
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", SWA_PERIOD.get(arch, 0))
    if isinstance(pattern, (list, tuple)):  # per-layer flags
        return tuple(bool(p) for p in pattern)
    period = int(pattern)
    return tuple(period == 0 or il % period < period - 1 for il in range(n_layer))


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
        # missing keys read as llama.cpp's defaults would: a header llama.cpp then refuses
        # still gets an estimate (the memory estimate runs before the load)
        n_layer = int(meta.get(f"{arch}.block_count", 0) or 0)
        n_head = int(meta.get(f"{arch}.attention.head_count", 1) or 1)
        head_kv = _per_layer(meta.get(f"{arch}.attention.head_count_kv", n_head), n_layer)
        head_dim = int(meta.get(f"{arch}.embedding_length", 0) or 0) // n_head
        key_len = int(meta.get(f"{arch}.attention.key_length", head_dim))
        value_len = int(meta.get(f"{arch}.attention.value_length", key_len))
        n_swa = int(meta.get(f"{arch}.attention.sliding_window", 0) or 0)
        return cls(n_embd_k=tuple(h * key_len for h in head_kv),
                   n_embd_v=tuple(h * value_len for h in head_kv),
                   swa=_window_layers(meta, arch, n_layer, n_swa), n_swa=n_swa,
                   head_k=key_len, head_v=value_len)

    @classmethod
    def gpt_oss_20b(cls) -> KVLayout:
        """openai/gpt-oss-20b's config: 24 layers, 8 KV heads x 64, even layers window 128."""
        return cls(n_embd_k=(512,) * 24, n_embd_v=(512,) * 24,
                   swa=tuple(il % 2 == 0 for il in range(24)), n_swa=128, head_k=64, head_v=64)

    def kv_type_problem(self, kv_type: str) -> str | None:
        """Why llama.cpp would refuse this cache type for this model (None: it accepts it).

        A quantized cache stores each head in whole blocks of 32 values; llama.cpp
        refuses the context (NULL) when a head is not a multiple of the block.
        """
        block = GGML_QUANT_SIZES[KV_TYPES[kv_type]][0]
        if self.head_k % block or self.head_v % block:
            return (f"KV_CACHE_TYPE={kv_type} needs heads of a multiple of {block} values; "
                    f"this model's heads have {self.head_k} (K) and {self.head_v} (V)")
        return None

    def layer_bytes(self, il: int, cells: int, kv_type: str = "f16") -> int:
        """K+V bytes of layer ``il`` holding ``cells`` cells."""
        t = KV_TYPES[kv_type]
        return _row_bytes(t, self.n_embd_k[il] * cells) + _row_bytes(t, self.n_embd_v[il] * cells)

    def bytes_per_token(self, kv_type: str = "f16", *, window: bool) -> int:
        """K+V bytes of one cached token over the full-attention (or window) layers."""
        return sum(self.layer_bytes(il, 1, kv_type) for il, s in enumerate(self.swa)
                   if s == window)


def kv_cells(n_ctx: int, *, n_seq: int = 1, n_swa: int = 0, swa_full: bool = True,
             unified: bool = True, n_ubatch: int = 512) -> tuple[int, int]:
    """Cells of the full-attention and sliding-window caches, all streams together.

    Args:
        n_ctx: the context asked for (the pool of every sequence together).
        n_seq: sequences (``n_seq_max``).
        n_swa: the model's window (0: none).
        swa_full: True keeps a full-size window cache (prefixes can be cut back);
            False keeps ``n_swa`` cells per sequence plus one micro-batch.
        unified: one cell pool for every sequence (``kv_unified``); else one stream of
            ``n_ctx / n_seq`` cells per sequence.
        n_ubatch: the micro-batch size (part of a window-sized cache).
    """
    n_ctx = _pad(n_ctx)
    streams = 1 if unified else n_seq
    per_stream = n_ctx if unified else _pad(n_ctx // n_seq)
    if swa_full:
        swa_per_stream = per_stream
    else:
        swa_per_stream = _pad(min(per_stream, n_swa * (n_seq if unified else 1) + n_ubatch))
    return per_stream * streams, swa_per_stream * streams


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


def kv_cache_bytes(layout: KVLayout, *, n_ctx: int, n_seq: int = 1, kv_type: str = "f16",
                   swa_full: bool = True, unified: bool = True, n_ubatch: int = 512) -> KVBytes:
    """The bytes llama.cpp allocates for the KV cache (see :func:`kv_cells` for the args).

    Returns:
        Cells and bytes of both caches.
    """
    full_cells, swa_cells = kv_cells(n_ctx, n_seq=n_seq, n_swa=layout.n_swa, swa_full=swa_full,
                                     unified=unified, n_ubatch=n_ubatch)
    has_swa = any(layout.swa)
    return KVBytes(full_cells, full_cells * layout.bytes_per_token(kv_type, window=False),
                   swa_cells if has_swa else 0,
                   swa_cells * layout.bytes_per_token(kv_type, window=True))

