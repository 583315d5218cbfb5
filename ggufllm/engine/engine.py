"""The engine: one loaded model, one context, and the scheduler thread that owns it.

:meth:`Engine.submit` hands a prompt to the :class:`~.scheduler.Scheduler`, the
only code that calls ``llama_decode``; :meth:`Engine.stream` wraps it in a plain
iterator of :class:`~ggufllm.chunks.Chunk` values. Everything else (the
blocking answer, the async stream, the CLI, the server) is a fold over those
chunks.

The KV cache is one unified pool of ``n_ctx_seq x n_parallel`` cells (unless
``kv_cache_tokens`` says otherwise) shared by ``n_parallel`` sequences. A new
prompt goes to the slot whose cached tokens share its longest prefix; only the
rest is evaluated (a RAG app asking several questions over one document pays
for the document once).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..config import ExtraBuffersMode, GenerationConfig, KVCacheType, KVReuse
from ..errors import (
    ConfigError,
    EngineFailedError,
    ServiceClosedError,
)
from ..gguf_file import GGUFSummary, read_gguf_header
from ..harmony import Turn
from ..kvlayout import KVLayout, kv_cache_bytes
from .fit import check_budget
from .kvcache import PrefixCache
from .kvfile import KVCacheIdentity
from .kvstore import KVStore
from .native import NativeContext, NativeModel, ProgressFn
from .output import HarmonyReader, OutputReader, TextReader
from .prompt import Prompt, PromptBuilder, PromptKind
from .sampling import VocabView
from .scheduler import ProgressCallback, Request, Scheduler, Sink
from .slots import PAGE, SlotTable
from .streams import ChunkStream

__all__ = ["Engine", "EngineOptions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """How to load a model (validated upstream by :class:`~ggufllm.config.Settings`).

    ``n_ctx`` is the window of one request (``MAX_LENGTH``); the KV pool holds
    ``kv_cache_tokens`` cells, by default ``n_ctx x n_parallel``.
    """

    n_ctx: int = 4096
    n_gpu_layers: int = -1
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    n_threads: int | None = None
    n_batch: int = 512
    flash_attn: bool | None = None
    n_parallel: int = 4
    max_queue: int = 64
    kv_cache_type: KVCacheType = "f16"
    kv_cache_tokens: int | None = None
    swa_full: bool = True
    kv_cache_ram_mb: int = 1024
    cpu_extra_buffers: ExtraBuffersMode = "auto"
    current_date: str = "none"  # CURRENT_DATE: none | today | YYYY-MM-DD
    kv_reuse: KVReuse = "fast"  # KV_REUSE: fast | exact

    @property
    def pool_tokens(self) -> int:
        return self.kv_cache_tokens or self.n_ctx * self.n_parallel


class Engine:
    """Owns a loaded model, its context and the scheduler thread; thread-safe.

    Args:
        path: the GGUF file; its header is checked before llama.cpp sees it.
        options: context, concurrency and offload settings.
        progress: load progress callback (0..1); returning False cancels.
        on_failure: called (from the scheduler thread, once the native memory is freed)
            if the scheduler stops on an unexpected error.

    Raises:
        ModelLoadError: the file is not a usable GGUF (or the load was cancelled).
        ConfigError: the settings cannot make a context (a quantized KV cache
            without flash attention).
    """

    def __init__(self, path: str, options: EngineOptions | None = None,
                 progress: ProgressFn | None = None,
                 on_failure: Callable[[EngineFailedError], None] | None = None) -> None:
        options = options or EngineOptions()
        self.summary: GGUFSummary = read_gguf_header(path)
        self.path = path
        self.options = options
        _check_kv_type(self.summary, options.kv_cache_type)
        self._native_lock = threading.Lock()
        self._freed = False
        self._model = NativeModel(path, n_gpu_layers=options.n_gpu_layers, cpu_moe=options.cpu_moe,
                                  n_cpu_moe=options.n_cpu_moe, progress=progress,
                                  extra_buffers=options.cpu_extra_buffers, summary=self.summary,
                                  n_threads=options.n_threads)
        self.kernel_verdict = self._model.kernel_verdict
        try:
            self._ctx = NativeContext(
                self._model, n_ctx=options.pool_tokens,
                n_batch=max(options.n_batch, options.n_parallel), n_threads=options.n_threads,
                flash_attn=options.flash_attn, n_seq_max=options.n_parallel,
                kv_type=options.kv_cache_type, swa_full=options.swa_full)
            self.prompts = PromptBuilder(self._model, self.summary.architecture,
                                         options.current_date)
            # the most bytes of text one token stands for (None: the vocabulary cannot
            # tell); read at load, since a vocabulary-long loop of native calls beside a
            # running scheduler was seen to pause its streams for a second (the GIL)
            self.max_token_bytes: int | None = self._model.max_token_bytes(
                self.summary.token_bytes)
        except BaseException:
            self._free_native()
            raise
        self.n_ctx = min(options.n_ctx, self._ctx.n_ctx)  # one request's window
        self.slots = SlotTable(self._ctx, options.n_parallel, self._model.n_swa,
                               exact=options.kv_reuse == "exact")
        self.kv_store = self._kv_store()
        self.slots.on_evict, self.slots.on_place = self.kv_store.on_evict, self.kv_store.on_place
        self._close_lock = threading.Lock()
        self._closed = False
        self.scheduler = Scheduler(self._ctx, self.slots, n_ctx_seq=self.n_ctx,
                                   max_queue=options.max_queue, n_vocab=self._model.n_vocab,
                                   on_exit=self._free_native, on_failure=on_failure)

    def _kv_store(self) -> KVStore:
        """The host-RAM prefix cache over this context, and what its files are valid for."""
        o = self.options
        # a quantized cache turns flash attention on (native._flash_attn_type)
        flash_attn = True if o.kv_cache_type != "f16" else o.flash_attn
        exact = o.kv_reuse == "exact"
        cache = PrefixCache(o.kv_cache_ram_mb << 20, n_swa=self._model.n_swa,
                            flash_attn=flash_attn, page=PAGE if exact else 1, exact=exact)
        return KVStore(self._ctx.ptr, cache, lambda: KVCacheIdentity.of(
            self.summary, n_ctx=self._ctx.n_ctx, n_seq=o.n_parallel, kv_unified=True,
            kv_type=o.kv_cache_type, swa_full=o.swa_full, flash_attn=flash_attn,
            kv_reuse=o.kv_reuse))

    # -- facts ---------------------------------------------------------------

    @property
    def failure(self) -> EngineFailedError | None:
        """Why the scheduler stopped on its own (None while it runs or after a close)."""
        return self.scheduler.failure

    @property
    def model(self) -> NativeModel:
        return self._model

    @property
    def prompt_kind(self) -> PromptKind:
        return self.prompts.kind

    @contextmanager
    def _native(self) -> Iterator[NativeModel]:
        """The model, for work in a caller's thread (never across a ``yield`` to a caller).

        Raises:
            ServiceClosedError: the native memory was freed.
        """
        with self._native_lock:
            if self._freed:
                raise self.failure or ServiceClosedError("the model was closed")
            yield self._model

    def build(self, turns: Sequence[Turn], cfg: GenerationConfig,
              instructions: str | None = None, *, question: str | None = None) -> Prompt:
        """Renders and tokenizes a conversation (see :meth:`PromptBuilder.build`)."""
        with self._native():
            return self.prompts.build(turns, cfg, instructions, question=question)

    def raw(self, text: str, cfg: GenerationConfig) -> Prompt:
        """A raw continuation prompt (see :meth:`PromptBuilder.raw`)."""
        with self._native():
            return self.prompts.raw(text, cfg)

    def tokenize(self, text: str) -> list[int]:
        with self._native() as model:
            return model.tokenize(text, add_special=False, parse_special=False)

    def detokenize(self, tokens: Sequence[int]) -> str:
        with self._native() as model:
            return b"".join(model.piece(t) for t in tokens).decode("utf-8", "ignore")

    def model_facts(self) -> dict[str, int]:
        """Parameter count, size in bytes and trained context of the model."""
        with self._native() as m:
            return {"n_params": m.n_params, "size_bytes": m.size_bytes,
                    "n_ctx_train": m.n_ctx_train}

    def kv_cache_info(self) -> dict[str, Any]:
        """What the KV cache holds and costs (see ``LLMService.get_model_info``); safe from any
        thread (the slots' counters are read as a snapshot).

        Raises:
            ServiceClosedError: the native memory was freed.
        """
        o, ctx = self.options, self._ctx
        with self._native() as model:  # an unload frees the model under an unlocked read
            n_swa = model.n_swa
        try:
            size: int | None = kv_cache_bytes(
                KVLayout.from_gguf(self.summary), n_ctx=ctx.n_ctx, kv_type=o.kv_cache_type,
                swa_full=o.swa_full, n_seq=o.n_parallel, n_ubatch=min(ctx.n_batch, 512)).total
        except (KeyError, TypeError, ValueError):  # per-layer head counts: not modelled
            size = None
        info: dict[str, Any] = {
            "n_ctx": self.n_ctx, "n_ctx_pool": ctx.n_ctx, "n_parallel": o.n_parallel,
            "type": o.kv_cache_type, "swa_full": o.swa_full, "n_swa": n_swa,
            "reuse": o.kv_reuse,
            "bytes": size, "tokens_evaluated": self.scheduler.tokens_evaluated,
        }
        info.update(self.slots.stats())
        info.update(self.kv_store.stats())
        return info

    # -- lifecycle -----------------------------------------------------------

    def _free_native(self) -> None:
        # callers' threads tokenize under this lock: never free the vocabulary under them
        with self._native_lock:
            self._freed = True
            ctx = getattr(self, "_ctx", None)
            if ctx is not None:
                ctx.close()
            self._model.close()

    def close(self) -> None:
        """Cancels every request, stops the scheduler, then frees the context and the model."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.scheduler.close()  # the scheduler thread frees the native memory as it exits

    def clear_cache(self) -> int:
        """Drops every prefix the idle slots and the RAM cache hold (running requests keep
        theirs).

        Returns:
            How many cached tokens were dropped from the slots.
        """
        if self._closed:
            return 0

        def clear() -> int:
            hook, self.slots.on_evict = self.slots.on_evict, None  # dropped, not saved
            try:
                return self.slots.clear_idle()
            finally:
                self.slots.on_evict = hook

        dropped = int(self.scheduler.call(clear))
        self.kv_store.cache.clear()
        return dropped

    def save_kv_cache(self, path: str) -> int:
        """Writes every cached prefix (RAM cache and idle slots) to ``path`` atomically.

        Returns:
            How many prefixes the file holds.

        Raises:
            OSError: the file could not be written (an existing file is unchanged).
            ServiceClosedError: the engine was closed.
        """
        if self._closed:
            raise ServiceClosedError("the model was closed")
        # the slots' states are copied between two steps (whatever KV_CACHE_RAM_MB); the
        # file is written here, least recently used first (a smaller budget that loads it
        # keeps the newest), whatever slot each prefix happens to sit in
        held = self.scheduler.call(lambda: self.kv_store.snapshot_slots(
            sorted((s for s in self.slots.slots if not s.busy), key=lambda s: s.last_used)))
        return self.kv_store.save(path, held)

    def load_kv_cache(self, path: str, *, trusted: bool = False) -> int:
        """Adds the prefixes of a file written by :meth:`save_kv_cache` to the RAM cache.

        Args:
            trusted: accept a file signed with another user's key.

        Returns:
            How many of the file's prefixes the RAM cache holds (its newest that fit).

        Raises:
            KVCacheMismatchError, KVCacheUntrustedError, KVCacheError: see
                :func:`~.kvfile.read_prefixes`.
        """
        if self._closed:
            raise ServiceClosedError("the model was closed")
        return self.kv_store.load(path, trusted=trusted)

    # -- generation ----------------------------------------------------------

    def reader(self, prompt: Prompt) -> OutputReader:
        if prompt.raw:
            return TextReader(self._model, prompt.stops, strip_start=False)
        if self.prompts.harmony is not None:
            return HarmonyReader(self._model, self.prompts.harmony, prompt.stops,
                                 calls=prompt.calls)
        return TextReader(self._model, prompt.stops)

    def submit(self, prompt: Prompt, cfg: GenerationConfig, sink: Sink,
               on_prompt_progress: ProgressCallback | None = None,
               cancel: threading.Event | None = None) -> Request:
        """Queues a generation whose chunks go to ``sink`` (from the scheduler thread).

        Returns:
            The request (set ``request.cancel`` to stop it at the next step).

        Raises:
            ContextLengthExceededError, InvalidParameterError: the budget does not fit.
            ServerBusyError: the wait queue is full.
            ServiceClosedError: the engine was closed.
        """
        if self._closed:
            raise ServiceClosedError("the model was closed")
        check_budget(len(prompt.tokens), cfg.max_tokens, self.n_ctx)
        with self._native() as model:
            reader = self.reader(prompt)
            if cfg.response_format is not None or (cfg.tools and cfg.tool_choice != "none"):
                # the grammar's slow reads of the vocabulary (its control tokens, ~0.5 s on
                # o200k; the probes' index once wanted, ~1 s) happen here, on the caller's
                # thread, not on the one that decodes every other request
                VocabView(model.vocab, model.ptr).prepare()
        request = Request(prompt.tokens, cfg, reader, sink, on_prompt_progress, cancel,
                          n_shared=prompt.n_shared)
        self.scheduler.submit(request)
        return request

    def stream(self, prompt: Prompt, cfg: GenerationConfig,
               on_prompt_progress: ProgressCallback | None = None) -> ChunkStream:
        """Submits a generation now and returns its chunks as an iterator.

        One chunk per sampled token, then a last chunk with the finish reason and
        timings. Closing the stream (or dropping it) cancels the request.

        Raises:
            Everything :meth:`submit` raises, at call time.
        """
        cancel = threading.Event()
        stream = ChunkStream(cancel, dropped_turns=prompt.dropped_turns)
        self.submit(prompt, cfg, stream.sink, on_prompt_progress, cancel)
        return stream


def _check_kv_type(summary: GGUFSummary, kv_type: KVCacheType) -> None:
    """Refuses a cache type llama.cpp would refuse (with a NULL context) for this model."""
    try:
        problem = KVLayout.from_gguf(summary).kv_type_problem(kv_type)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # odd header: llama.cpp decides
        return
    if problem:
        raise ConfigError(problem, "KV_CACHE_TYPE")
