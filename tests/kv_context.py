"""A bare llama.cpp context for the KV-cache tests: any cache mode, explicit sequences."""

from __future__ import annotations

import logging
import re

import llama_cpp.llama_cpp as lib
import numpy as np

from ggufllm.engine.native import NativeModel
from ggufllm.kvlayout import KV_TYPES

# Fixed thread counts: the flash-attention kernel splits a one-token decode by thread, so
# restore measurements use 2; the rest use 1 (a loaded box makes 2 threads spin for long).
N_THREADS = 1
BATCH = 512

_SIZE_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, "
                        r"+\d+/(\d+) seqs")


class RawContext:
    """A llama.cpp context decoding explicit (sequence, position) batches.

    Args:
        model: the loaded model.
        n_ctx, n_seq, unified, swa_full, kv_type, flash_attn: the cache mode.
        n_threads: threads of every decode.
    """

    def __init__(self, model: NativeModel, *, n_ctx: int, n_seq: int = 1, unified: bool = True,
                 swa_full: bool = True, kv_type: str = "f16", flash_attn: bool | None = None,
                 n_threads: int = N_THREADS) -> None:
        p = lib.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, BATCH, BATCH
        p.n_seq_max, p.kv_unified, p.swa_full = n_seq, unified, swa_full
        p.type_k = p.type_v = int(KV_TYPES[kv_type])
        p.n_threads = p.n_threads_batch = n_threads
        p.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None
                             else int(flash_attn))
        p.no_perf = True
        self.model = model
        self.ptr = lib.llama_init_from_model(model.ptr, p)
        assert self.ptr, "llama.cpp refused the context"
        self.mem = lib.llama_get_memory(self.ptr)
        self._batch = lib.llama_batch_init(BATCH, 0, 1)

    def close(self) -> None:
        lib.llama_batch_free(self._batch)
        lib.llama_free(self.ptr)

    def __enter__(self) -> RawContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clear(self) -> None:
        lib.llama_memory_clear(self.mem, True)

    def decode(self, tokens: list[int], start: int, seq: int = 0) -> np.ndarray:
        """Evaluates ``tokens`` at positions ``start...`` of ``seq``; the last one's logits."""
        b = self._batch
        for off in range(0, len(tokens), BATCH):
            part = tokens[off:off + BATCH]
            b.n_tokens = len(part)
            for i, t in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, start + off + i, 1, 0
                b.seq_id[i][0] = seq
            b.logits[len(part) - 1] = 1
            rc = lib.llama_decode(self.ptr, b)
            assert rc == 0, f"llama_decode returned {rc}"
        logits = lib.llama_get_logits_ith(self.ptr, len(part) - 1)
        return np.ctypeslib.as_array(logits, shape=(self.model.n_vocab,)).copy()

    def greedy(self, logits: np.ndarray, pos: int, seq: int = 0, n: int = 4) -> list[np.ndarray]:
        """The logits of ``n`` greedy steps from ``logits`` (the first included)."""
        out = [logits]
        for _ in range(n):
            out.append(self.decode([int(np.argmax(out[-1]))], pos, seq))
            pos += 1
        return out

    def pos_range(self, seq: int) -> tuple[int, int]:
        return (lib.llama_memory_seq_pos_min(self.mem, seq),
                lib.llama_memory_seq_pos_max(self.mem, seq))


class KVSizeLog(logging.Handler):
    """Collects llama.cpp's ``llama_kv_cache: size = ...`` lines (one per cache)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.sizes: list[tuple[float, int, int]] = []  # (MiB, cells of all streams, layers)

    def emit(self, record: logging.LogRecord) -> None:
        m = _SIZE_LINE.search(record.getMessage())
        if m:  # the line counts the cells of one stream (one per sequence if not unified)
            self.sizes.append((float(m[1]), int(m[2]) * int(m[4]), int(m[3])))


def random_prompt(n: int, seed: int = 0, high: int = 199998) -> list[int]:
    """``n`` ordinary token ids (below every special token of both test vocabularies)."""
    return np.random.default_rng(seed).integers(100, high, n).tolist()
