"""Owners of llama.cpp's native handles: model, context, sampler.

Each class owns exactly one handle and frees it in ``close()`` (idempotent);
the engine closes children (sampler, context) before the parent (model).
Nothing is freed by ``__del__`` alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp.llama_cpp as lib

from ..config import GenerationConfig
from ..errors import LoadCancelledError, ModelLoadError

__all__ = ["NativeModel", "NativeContext", "Sampler", "ensure_backend"]

logger = logging.getLogger(__name__)
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
            lib.llama_backend_init()
            _backend_ready = True


ProgressFn = Callable[[float], bool]


def default_threads() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class NativeModel:
    """Owns a ``llama_model`` and its vocabulary.

    Args:
        path: a GGUF file that passed :func:`ggufllm.gguf_file.read_gguf_header`.
        n_gpu_layers: layers to offload (-1 = all; ignored by a CPU build).
        cpu_moe: keep every MoE expert tensor in CPU memory.
        n_cpu_moe: keep the expert tensors of the first N layers in CPU memory.
        progress: called with 0..1 while loading; returning False cancels.
    """

    def __init__(self, path: str, *, n_gpu_layers: int = -1, cpu_moe: bool = False,
                 n_cpu_moe: int = 0, progress: ProgressFn | None = None,
                 vocab_only: bool = False) -> None:
        from ..gpu.placement import TensorOverrides

        ensure_backend()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers < 0 else n_gpu_layers
        # the array must outlive the load: llama.cpp reads it while placing tensors
        self._overrides = TensorOverrides.for_experts(cpu_moe, n_cpu_moe)
        if self._overrides is not None:
            params.tensor_buft_overrides = self._overrides.address
        params.vocab_only = vocab_only
        cancelled = False

        def on_progress(fraction: float, _user: ctypes.c_void_p) -> bool:
            nonlocal cancelled
            if progress is None:
                return True
            try:
                keep_going = progress(float(fraction)) is not False
            except Exception:  # an exception must not cross into C
                logger.exception("load progress callback failed; cancelling the load")
                keep_going = False
            cancelled = not keep_going
            return keep_going

        # Keep the ctypes callback alive for the duration of the load.
        self._progress_cb: Any = lib.llama_progress_callback(on_progress)
        params.progress_callback = self._progress_cb
        self.path = path
        self._ptr = lib.llama_model_load_from_file(path.encode(), params)
        self._progress_cb = None
        if not self._ptr:
            if cancelled:
                raise LoadCancelledError(path)
            raise ModelLoadError(path, ["llama.cpp refused the file (see the debug log)"])
        self.vocab = lib.llama_model_get_vocab(self._ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)

    @property
    def ptr(self) -> lib.llama_model_p:
        if not self._ptr:
            raise RuntimeError("model is closed")
        return self._ptr

    def close(self) -> None:
        if self._ptr:
            lib.llama_model_free(self._ptr)
            self._ptr = None

    # -- vocabulary ----------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (lib.llama_token * n_max)()
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (lib.llama_token * n_max)()
            n = lib.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special,
                                   parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (no leading-space stripping)."""
        buf = ctypes.create_string_buffer(64)
        n = lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def special_token_id(self, text: str) -> int | None:
        """The id of a special token written as text, if it is one token."""
        ids = self.tokenize(text, add_special=False, parse_special=True)
        return ids[0] if len(ids) == 1 else None

    def is_eog(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_eog(self.vocab, token))

    @property
    def bos_id(self) -> int:
        return int(lib.llama_vocab_bos(self.vocab))

    @property
    def eos_id(self) -> int:
        return int(lib.llama_vocab_eos(self.vocab))

    @property
    def add_bos(self) -> bool:
        return bool(lib.llama_vocab_get_add_bos(self.vocab))

    def meta(self, key: str) -> str | None:
        size = 1 << 16
        buf = ctypes.create_string_buffer(size)
        n = lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
        if n < 0:
            return None
        if n >= size:
            buf = ctypes.create_string_buffer(n + 1)
            lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", "replace")

    @property
    def n_params(self) -> int:
        return int(lib.llama_model_n_params(self.ptr))

    @property
    def size_bytes(self) -> int:
        return int(lib.llama_model_size(self.ptr))

    @property
    def n_ctx_train(self) -> int:
        return int(lib.llama_model_n_ctx_train(self.ptr))


class NativeContext:
    """Owns a ``llama_context`` (and so the KV cache) of one model."""

    def __init__(self, model: NativeModel, *, n_ctx: int, n_batch: int,
                 n_threads: int | None, flash_attn: bool | None) -> None:
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, params.n_ubatch)
        # llama.cpp's default is 4 threads whatever the machine; more threads than
        # cores makes decoding several times slower.
        threads = n_threads or default_threads()
        params.n_threads = threads
        params.n_threads_batch = threads
        # None = llama.cpp decides (on where the backend supports it)
        params.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None
                                  else int(flash_attn))
        params.no_perf = True
        self._ptr = lib.llama_init_from_model(model.ptr, params)
        if not self._ptr:
            raise ModelLoadError(model.path, [f"llama.cpp could not create a context of "
                                              f"{n_ctx} tokens (out of memory?)"])
        self.n_ctx = int(lib.llama_n_ctx(self._ptr))
        self.n_batch = n_batch
        self._one = (lib.llama_token * 1)()
        self._memory = lib.llama_get_memory(self._ptr)

    @property
    def ptr(self) -> lib.llama_context_p:
        if not self._ptr:
            raise RuntimeError("context is closed")
        return self._ptr

    def close(self) -> None:
        if self._ptr:
            lib.llama_free(self._ptr)
            self._ptr = None

    def decode(self, tokens: Sequence[int]) -> None:
        """Evaluates ``tokens`` (appended to sequence 0) in batches of ``n_batch``."""
        for start in range(0, len(tokens), self.n_batch):
            part = tokens[start:start + self.n_batch]
            arr = (lib.llama_token * len(part))(*part)
            rc = lib.llama_decode(self.ptr, lib.llama_batch_get_one(arr, len(part)))
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")

    def decode_one(self, token: int) -> None:
        """Evaluates one sampled token (the per-token path: one reused buffer)."""
        self._one[0] = token
        rc = lib.llama_decode(self.ptr, lib.llama_batch_get_one(self._one, 1))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def keep_prefix(self, n: int) -> bool:
        """Drops the KV cache past position ``n``; False if the cache cannot do it."""
        return bool(lib.llama_memory_seq_rm(self._memory, 0, n, -1))

    def clear(self) -> None:
        lib.llama_memory_clear(self._memory, True)


class Sampler:
    """Owns a llama.cpp sampler chain built from a :class:`GenerationConfig`."""

    def __init__(self, cfg: GenerationConfig) -> None:
        self._ptr = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lambda s: lib.llama_sampler_chain_add(self._ptr, s)  # noqa: E731
        if cfg.repeat_penalty != 1.0:
            add(lib.llama_sampler_init_penalties(64, cfg.repeat_penalty, 0.0, 0.0))
        if cfg.temperature == 0:
            add(lib.llama_sampler_init_greedy())
            return
        if cfg.top_k > 0:
            add(lib.llama_sampler_init_top_k(cfg.top_k))
        if cfg.top_p < 1.0:
            add(lib.llama_sampler_init_top_p(cfg.top_p, 1))
        if cfg.min_p > 0:
            add(lib.llama_sampler_init_min_p(cfg.min_p, 1))
        add(lib.llama_sampler_init_temp(cfg.temperature))
        seed = lib.LLAMA_DEFAULT_SEED if cfg.seed is None else cfg.seed
        add(lib.llama_sampler_init_dist(seed))

    def sample(self, ctx: NativeContext) -> int:
        return int(lib.llama_sampler_sample(self._ptr, ctx.ptr, -1))

    def close(self) -> None:
        if self._ptr:
            lib.llama_sampler_free(self._ptr)
            self._ptr = None
