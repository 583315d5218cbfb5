"""The engine: one loaded model, one context, one lock, one decode loop.

:meth:`Engine.stream` is the only decode loop in ggufllm. It yields
:class:`~ggufllm.chunks.Chunk` values; everything else (the blocking answer,
the async stream, the CLI, the server) is a fold over it.

The KV cache keeps the tokens of the last call; the next call evaluates only
what differs from that prefix (a RAG app that asks several questions over the
same system prompt pays for it once).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..chunks import Chunk, FinishReason, Timings
from ..config import GenerationConfig
from ..errors import ContextLengthExceededError, InvalidParameterError, ServiceClosedError
from ..gguf_file import GGUFSummary, read_gguf_header
from .native import NativeContext, NativeModel, ProgressFn, Sampler
from .output import HarmonyReader, OutputReader, TextReader
from .prompt import Prompt, PromptBuilder, PromptKind

__all__ = ["Engine", "EngineOptions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """How to load a model (validated upstream by :class:`~ggufllm.config.Settings`)."""

    n_ctx: int = 4096
    n_gpu_layers: int = -1
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    n_threads: int | None = None
    n_batch: int = 512
    flash_attn: bool | None = None


class Engine:
    """Owns a loaded model and its context; thread-safe through one lock.

    Args:
        path: the GGUF file; its header is checked before llama.cpp sees it.
        options: context and offload settings.
        progress: load progress callback (0..1); returning False cancels.

    Raises:
        ModelLoadError: the file is not a usable GGUF (or the load was cancelled).
    """

    def __init__(self, path: str, options: EngineOptions = EngineOptions(),
                 progress: ProgressFn | None = None) -> None:
        self.summary: GGUFSummary = read_gguf_header(path)
        self.path = path
        self.options = options
        self._lock = threading.Lock()
        self._model = NativeModel(path, n_gpu_layers=options.n_gpu_layers, cpu_moe=options.cpu_moe,
                                  n_cpu_moe=options.n_cpu_moe, progress=progress)
        try:
            n_ctx = options.n_ctx
            self._ctx = NativeContext(self._model, n_ctx=n_ctx, n_batch=options.n_batch,
                                      n_threads=options.n_threads, flash_attn=options.flash_attn)
            self.prompts = PromptBuilder(self._model, self.summary.architecture)
        except BaseException:
            self._model.close()
            raise
        self._cached: list[int] = []  # tokens whose K/V are in the cache, in order
        self._closed = False

    # -- facts ---------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self._ctx.n_ctx

    @property
    def model(self) -> NativeModel:
        return self._model

    @property
    def prompt_kind(self) -> PromptKind:
        return self.prompts.kind

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text, add_special=False, parse_special=False)

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Frees the context, then the model. Waits for a running generation."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ctx.close()
            self._model.close()

    def clear_cache(self) -> None:
        """Empties the KV cache (the next call evaluates its whole prompt)."""
        with self._lock:
            if not self._closed:
                self._ctx.clear()
                self._cached = []

    # -- generation ----------------------------------------------------------

    def check_budget(self, prompt: Prompt, cfg: GenerationConfig) -> None:
        """Raises if the prompt does not fit or the budget exceeds the window."""
        n_prompt = len(prompt.tokens)
        if cfg.max_tokens > self.n_ctx:
            raise InvalidParameterError(
                f"max_tokens={cfg.max_tokens} exceeds the context window of {self.n_ctx}",
                "max_tokens")
        if n_prompt == 0:
            raise InvalidParameterError("the prompt is empty", "question")
        if n_prompt + cfg.max_tokens > self.n_ctx:
            raise ContextLengthExceededError(n_prompt, self.n_ctx, cfg.max_tokens)

    def stream(self, prompt: Prompt, cfg: GenerationConfig,
               cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Generates from ``prompt``, one chunk per sampled token, then a last chunk
        with the finish reason and timings.

        The model lock is held from the first ``next()`` until the generator
        finishes or is closed: breaking out of the loop frees the model at once.
        Setting ``cancel`` stops at the next token with reason ``cancelled``.

        Raises:
            ContextLengthExceededError, InvalidParameterError: before any decoding.
            ServiceClosedError: the engine was closed.
        """
        self.check_budget(prompt, cfg)
        with self._lock:
            if self._closed:
                raise ServiceClosedError("the model was closed")
            yield from self._run(prompt, cfg, cancel)

    def _prefill(self, tokens: Sequence[int]) -> int:
        """Evaluates what the cache lacks of ``tokens``; returns how many were reused."""
        cached = self._cached
        n = min(len(cached), len(tokens) - 1)  # the last token is always evaluated for logits
        common = 0
        while common < n and cached[common] == tokens[common]:
            common += 1
        if not self._ctx.keep_prefix(common):
            self._ctx.clear()
            common = 0
        self._cached = list(tokens[:common])
        rest = tokens[common:]
        self._ctx.decode(rest)
        self._cached.extend(rest)
        return common

    def _reader(self, prompt: Prompt) -> OutputReader:
        if self.prompts.harmony is not None:
            return HarmonyReader(self._model, self.prompts.harmony, prompt.stops)
        return TextReader(self._model, prompt.stops)

    def _run(self, prompt: Prompt, cfg: GenerationConfig,
             cancel: threading.Event | None) -> Iterator[Chunk]:
        ctx = self._ctx
        t0 = time.perf_counter()
        try:
            n_cached = self._prefill(prompt.tokens)
        except BaseException:
            ctx.clear()  # a half-evaluated prompt must not be reused
            self._cached = []
            raise
        t1 = time.perf_counter()
        reader = self._reader(prompt)
        sampler = Sampler(cfg)
        n_gen = 0
        finish: FinishReason = "length"
        try:
            for _ in range(cfg.max_tokens):
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                token = sampler.sample(ctx)
                n_gen += 1
                chunks, done = reader.feed(token)
                yield from chunks
                if done is not None:
                    finish = done
                    break
                # the token enters the cache only once shown: a consumer that stops
                # here leaves the cache consistent with self._cached
                ctx.decode_one(token)
                self._cached.append(token)
            yield from reader.flush(finish)
            timings = Timings(len(prompt.tokens), n_cached, n_gen, t1 - t0,
                              time.perf_counter() - t1)
            yield Chunk("", "final", (), finish, timings)
        finally:
            sampler.close()
