"""The memory a KV cache takes, from the GGUF header (no context needed).

llama.cpp stores, per layer and per cell, ``head_count_kv x key_length`` K values
and ``head_count_kv x value_length`` V values. Models with sliding-window layers
keep those layers in a second cache; without ``swa_full`` it holds only
``pad256(min(n_ctx, n_swa x n_seq + n_ubatch))`` cells (llama-kv-cache-iswa.cpp).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["kv_cache_bytes", "BYTES_PER_VALUE"]

# bytes per stored value: f16 is 2 bytes; q8_0 packs 32 values in 34 bytes, q4_0 in 18
BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# llama.cpp's built-in sliding-window layer patterns (src/models/*.cpp: load_swa_pattern)
_SWA_PATTERN = {"gemma3": 6, "gpt-oss": 2}


def _per_layer(value: Any, n_layer: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)] * n_layer


def _swa_layers(meta: Mapping[str, Any], arch: str, n_layer: int) -> list[bool]:
    if not meta.get(f"{arch}.attention.sliding_window"):
        return [False] * n_layer
    n = _SWA_PATTERN.get(arch, 1)
    return [n > 1 and il % n < n - 1 for il in range(n_layer)]


def _pad256(n: int) -> int:
    return (n + 255) // 256 * 256


def kv_cache_bytes(meta: Mapping[str, Any], *, n_ctx: int, kv_type: str, swa_full: bool,
                   n_seq: int, n_ubatch: int) -> dict[str, int]:
    """Bytes of the K and V caches for a context of ``n_ctx`` cells.

    Args:
        meta: the GGUF metadata (``general.architecture`` and the attention keys).
        n_ctx: cells of the pool; kv_type: ``f16``/``q8_0``/``q4_0``;
        swa_full: full-size window cache; n_seq: sequences; n_ubatch: physical batch.

    Returns:
        ``{"bytes", "full_layers", "swa_layers", "swa_cells"}``.
    """
    arch = str(meta.get("general.architecture", ""))
    n_layer = int(meta.get(f"{arch}.block_count", 0))
    n_head = _per_layer(meta.get(f"{arch}.attention.head_count", 1), n_layer)
    n_head_kv = _per_layer(meta.get(f"{arch}.attention.head_count_kv", n_head), n_layer)
    n_embd = int(meta.get(f"{arch}.embedding_length", 0))
    k_len = int(meta.get(f"{arch}.attention.key_length", n_embd // max(1, n_head[0])))
    v_len = int(meta.get(f"{arch}.attention.value_length", k_len))
    swa = _swa_layers(meta, arch, n_layer)
    n_swa = int(meta.get(f"{arch}.attention.sliding_window", 0) or 0)
    swa_cells = n_ctx if swa_full or not any(swa) else min(n_ctx, _pad256(n_swa * n_seq + n_ubatch))
    per_value = BYTES_PER_VALUE[kv_type]
    total = 0.0
    for il in range(n_layer):
        cells = swa_cells if swa[il] else n_ctx
        total += cells * n_head_kv[il] * (k_len + v_len) * per_value
    return {"bytes": int(total), "full_layers": swa.count(False), "swa_layers": swa.count(True),
            "swa_cells": swa_cells}
