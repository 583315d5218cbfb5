"""Owners of llama.cpp's native handles: model, context, batch, sampler.

Each class owns exactly one handle and frees it in ``close()`` (idempotent);
the engine closes children (sampler, context) before the parent (model).
Nothing is freed by ``__del__`` alone.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any

import llama_cpp.llama_cpp as lib
import numpy as np

from ..config import ExtraBuffersMode
from ..errors import ConfigError, LoadCancelledError, ModelLoadError
from ..kvlayout import KV_TYPES
from ..native.kernels import KernelVerdict, decide_extra_buffers
from ..native.runtime import default_threads, ensure_backend
from .vocab_memo import forget

__all__ = ["NativeModel", "NativeContext", "Batch", "Sampler"]

logger = logging.getLogger(__name__)
# llama_vocab_type: SPM (SentencePiece) and BPE spell their input back byte for byte
_SPELLING_VOCABS = (1, 2)


ProgressFn = Callable[[float], bool]


class NativeModel:
    """Owns a ``llama_model`` and its vocabulary.

    Args:
        path: a GGUF file that passed :func:`ggufllm.gguf_file.read_gguf_header`.
        n_gpu_layers: layers to offload (-1 = all; ignored by a CPU build).
        cpu_moe: keep every MoE expert tensor in CPU memory.
        n_cpu_moe: keep the expert tensors of the first N layers in CPU memory.
        progress: called with 0..1 while loading; returning False cancels.
        vocab_only: load the vocabulary only (no weights, no kernel self-test).
        extra_buffers: ``CPU_EXTRA_BUFFERS`` (see :mod:`ggufllm.native.kernels`): whether
            llama.cpp may repack weights into its extra CPU buffer types.
        summary: the file's header, if already read (the self-test needs its weight types).
        n_threads: the threads that will decode (the self-test uses as many).

    Raises:
        ModelLoadError, LoadCancelledError: the load failed or was cancelled.
        KernelSelfTestError: ``extra_buffers="on"`` and the self-test failed.
    """

    def __init__(self, path: str, *, n_gpu_layers: int = -1, cpu_moe: bool = False,
                 n_cpu_moe: int = 0, progress: ProgressFn | None = None,
                 vocab_only: bool = False, extra_buffers: ExtraBuffersMode = "auto",
                 summary: Any = None, n_threads: int | None = None) -> None:
        from ..gpu.placement import TensorOverrides

        ensure_backend()
        self.kernel_verdict = _kernel_verdict(path, vocab_only, extra_buffers, summary, n_threads)
        params = lib.llama_model_default_params()
        params.use_extra_bufts = self.kernel_verdict.use_extra_buffers
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
            forget(self.vocab)  # what was computed for this vocabulary dies with it
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

    def max_token_bytes(self, token_bytes: np.ndarray | None = None) -> int | None:
        """The most bytes of input text one token can stand for, or None where that is unknown.

        Known for byte-level BPE and SentencePiece vocabularies, whose tokens spell their
        input back exactly (an unknown SentencePiece character is one ``<unk>`` per
        character, hence the floor of 4 bytes, UTF-8's longest). WordPiece and Unigram
        vocabularies normalize their input (case, accents, runs of spaces), so a token
        may stand for more text than its piece shows: None.

        Args:
            token_bytes: each token's stored text length in bytes (``GGUFSummary.token_bytes``).
                A piece is never longer than its stored text (byte-level BPE stores each byte
                as one 1- or 2-byte character, SentencePiece stores a space as 3-byte ``▁`` and
                a byte as ``<0xAB>``), so only the tokens whose stored text is longer than the
                longest piece found so far are decoded: a few thousand, not the whole
                vocabulary (~1 s for 262k tokens). Without it every token is decoded.
        """
        if lib.llama_vocab_type(self.vocab) not in _SPELLING_VOCABS:
            return None
        if token_bytes is None or len(token_bytes) != self.n_vocab:
            return max(4, max(len(self.piece(t, special=True)) for t in range(self.n_vocab)))
        best = 4
        for token in np.argsort(-token_bytes, kind="stable").tolist():
            if token_bytes[token] <= best:
                break  # no token left can decode to more than ``best`` bytes
            best = max(best, len(self.piece(token, special=True)))
        return best

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

    @property
    def n_swa(self) -> int:
        """The sliding-window size of the model's windowed layers (0: none)."""
        return int(lib.llama_model_n_swa(self.ptr))


def _kernel_verdict(path: str, vocab_only: bool, mode: ExtraBuffersMode, summary: Any,
                    n_threads: int | None) -> KernelVerdict:
    """Decides ``use_extra_bufts`` before llama.cpp repacks anything (see :mod:`..native.kernels`)."""
    if vocab_only:  # nothing is decoded
        return KernelVerdict(mode, False, "not tested", "vocabulary only")
    if summary is None:
        from ..gguf_file import read_gguf_header

        summary = read_gguf_header(path, probe=False)
    return decide_extra_buffers(mode, summary, n_threads or default_threads())


# KV cache element types (ggml_type) by the names KV_CACHE_TYPE accepts


class NativeContext:
    """Owns a ``llama_context`` (and so the KV cache) of one model.

    The KV cache is unified: one pool of ``n_ctx`` cells shared by ``n_seq_max``
    sequences, which is what lets a prefix be shared between sequences with
    :meth:`seq_cp` (a partial copy aborts the process in a split cache).

    Args:
        model: the loaded model.
        n_ctx: cells in the KV pool (all sequences together).
        n_batch: most tokens per ``llama_decode`` call.
        n_threads: CPU threads (None: the cores this process may use).
        flash_attn: None lets llama.cpp decide; a quantized V cache needs it on.
        n_seq_max: sequences (slots) decoded together.
        kv_type: ``f16``, ``q8_0`` or ``q4_0`` for both K and V.
        swa_full: full-size sliding-window cache (prefixes can be cut back and reused).

    Raises:
        ConfigError: a quantized KV cache with flash attention turned off.
        ModelLoadError: llama.cpp could not create the context.
    """

    def __init__(self, model: NativeModel, *, n_ctx: int, n_batch: int,
                 n_threads: int | None, flash_attn: bool | None, n_seq_max: int = 1,
                 kv_type: str = "f16", swa_full: bool = True) -> None:
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, params.n_ubatch)
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        params.swa_full = swa_full
        params.type_k = params.type_v = int(KV_TYPES[kv_type])  # ggml type ids
        # llama.cpp's default is 4 threads whatever the machine; more threads than
        # cores makes decoding several times slower.
        threads = n_threads or default_threads()
        params.n_threads = threads
        params.n_threads_batch = threads
        params.flash_attn_type = _flash_attn_type(flash_attn, kv_type)
        params.no_perf = True
        self._ptr = lib.llama_init_from_model(model.ptr, params)
        if not self._ptr:
            raise ModelLoadError(model.path, [f"llama.cpp could not create a context of "
                                              f"{n_ctx} tokens (out of memory?)"])
        self.n_ctx = int(lib.llama_n_ctx(self._ptr))
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.kv_type = kv_type
        self.swa_full = swa_full
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

    def decode(self, batch: Batch) -> int:
        """Evaluates ``batch``; returns llama_decode's code (0 ok, 1 no free KV cells)."""
        return int(lib.llama_decode(self.ptr, batch.native))

    # -- KV cache (sequences) -------------------------------------------------

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        """Drops positions [p0, p1) of ``seq`` (p1 = -1: to the end); False if it cannot."""
        return bool(lib.llama_memory_seq_rm(self._memory, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Shares positions [p0, p1) of ``src`` with ``dst`` (cell metadata only)."""
        lib.llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    def seq_pos_min(self, seq: int) -> int:
        """Smallest position ``seq`` holds (-1 when empty)."""
        return int(lib.llama_memory_seq_pos_min(self._memory, seq))

    def seq_pos_max(self, seq: int) -> int:
        """Largest position ``seq`` holds (-1 when empty)."""
        return int(lib.llama_memory_seq_pos_max(self._memory, seq))

    def clear(self) -> None:
        lib.llama_memory_clear(self._memory, True)


def _flash_attn_type(flash_attn: bool | None, kv_type: str) -> int:
    if kv_type == "f16":  # None = llama.cpp decides (on where the backend supports it)
        return lib.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None else int(flash_attn)
    if flash_attn is False:
        # llama.cpp would return a NULL context: a quantized V cache needs flash attention
        raise ConfigError(f"KV_CACHE_TYPE={kv_type} needs flash attention; FLASH_ATTN=false "
                          "turns it off (use KV_CACHE_TYPE=f16 or leave FLASH_ATTN unset)",
                          "KV_CACHE_TYPE")
    return lib.LLAMA_FLASH_ATTN_TYPE_ENABLED


class Batch:
    """Owns one ``llama_batch`` (``llama_batch_init``), refilled for every decode step.

    Args:
        capacity: most tokens it holds (``n_batch``).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.native = lib.llama_batch_init(capacity, 0, 1)
        self._live = True
        b = self.native
        # the arrays, looked up once: the per-token path indexes them directly
        self._token, self._pos, self._n_seq = b.token, b.pos, b.n_seq_id
        self._seq, self._logits = b.seq_id, b.logits
        self.n = 0

    def clear(self) -> None:
        self.n = 0
        self.native.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Appends one token; returns its index (where its logits will be)."""
        i = self.n
        self._token[i] = token
        self._pos[i] = pos
        self._n_seq[i] = 1
        self._seq[i][0] = seq
        self._logits[i] = logits
        self.n = i + 1
        self.native.n_tokens = i + 1
        return i

    def close(self) -> None:
        if self._live:
            lib.llama_batch_free(self.native)
            self._live = False


# the sampler lives in .sampling; imported here for the modules that take it from here
from .sampling import Sampler  # noqa: E402
