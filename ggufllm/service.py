"""LLMService: the public API, compatible with the service ggufllm replaces.

Every call is a fold over :meth:`ggufllm.engine.Engine.stream`:

- :meth:`LLMService.stream` yields chunks (sync);
- :meth:`LLMService.answer` / :meth:`generate_answer` fold them into an answer;
- :meth:`LLMService.astream` / :meth:`generate_answer_with_streaming` run the
  same generator in a worker thread and hand chunks to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from .chunks import Answer, Chunk
from .config import GenerationConfig, Settings, load_settings
from .engine import Engine, EngineOptions
from .engine.native import ProgressFn
from .errors import InvalidParameterError, LoadCancelledError, ServiceClosedError
from .gpu import gpu_info
from .gpu.placement import LoadReport, observe_load, placement_for_settings
from .harmony import Turn, rag_user_message
from .resolve import ResolvedModel, quantization_of, resolve_model

__all__ = ["LLMService"]

logger = logging.getLogger(__name__)
_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class LLMService:
    """Question answering over retrieved context with one GGUF model.

    Args:
        model_path: a ``.gguf`` file or a folder of them; None uses
            ``LLM_MODEL_PATH`` (default ``models/llm``), then the embedded model.
        settings: explicit settings; None reads the environment.
        progress: default load progress callback (0..1; return False to cancel).
        **overrides: settings fields to override (``max_length=8192``...).

    Raises:
        ConfigError: a setting is invalid (the message names the variable).
    """

    def __init__(self, model_path: str | Path | None = None, *, settings: Settings | None = None,
                 progress: ProgressFn | None = None, **overrides: Any) -> None:
        self.settings = settings if settings is not None else load_settings(**overrides)
        self.model_path = str(model_path) if model_path is not None else None
        self._generation: GenerationConfig = self.settings.generation()
        self._progress = progress
        self._engine: Engine | None = None
        self._resolved: ResolvedModel | None = None
        self._load_report: LoadReport | None = None
        self._load_lock = threading.Lock()
        self._cancel_load = threading.Event()
        self._closed = False

    # -- loading -------------------------------------------------------------

    def load(self, progress: ProgressFn | None = None) -> None:
        """Loads the model (blocking). A no-op when it is already loaded.

        Raises:
            ModelNotFoundError, ModelLoadError, LoadCancelledError, ServiceClosedError.
        """
        with self._load_lock:
            self._check_open()
            if self._engine is not None:
                return
            s = self.settings
            resolved = resolve_model(self.model_path, env_path=s.llm_model_path,
                                     use_quantization=s.use_quantization,
                                     load_in_8bit=s.load_in_8bit, load_in_4bit=s.load_in_4bit)
            self._cancel_load.clear()
            user_progress = progress or self._progress

            def on_progress(fraction: float) -> bool:
                if self._cancel_load.is_set():
                    return False
                return user_progress(fraction) is not False if user_progress else True

            placement = placement_for_settings(s, resolved.path)  # resolves N_GPU_LAYERS=auto
            options = EngineOptions(n_ctx=s.max_length, n_gpu_layers=placement.n_gpu_layers,
                                    cpu_moe=placement.cpu_moe, n_cpu_moe=placement.n_cpu_moe,
                                    n_threads=s.n_threads, n_batch=s.n_batch,
                                    flash_attn=s.flash_attn)
            if self._cancel_load.is_set():
                raise LoadCancelledError(str(resolved.path))
            with observe_load() as report:  # what llama.cpp placed where, from its log
                self._engine = Engine(str(resolved.path), options, on_progress)
            self._load_report = report
            self._resolved = resolved
            logger.info("loaded %s (%s prompts, n_ctx=%d)", resolved.path,
                        self._engine.prompt_kind.value, self._engine.n_ctx)

    async def load_model(self, progress: ProgressFn | None = None) -> None:
        """Loads the model in a worker thread, without blocking the event loop."""
        await asyncio.to_thread(self.load, progress)

    def cancel_load(self) -> None:
        """Cancels a load in progress (it raises :class:`LoadCancelledError`)."""
        self._cancel_load.set()

    @property
    def is_loaded(self) -> bool:
        return self._engine is not None

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceClosedError("this LLMService was cleaned up; create a new one")

    def _ensure_engine(self) -> Engine:
        self._check_open()
        engine = self._engine
        if engine is None:
            self.load()
            engine = self._engine
        assert engine is not None
        return engine

    # -- parameters ----------------------------------------------------------

    def update_generation_config(self, **params: Any) -> GenerationConfig:
        """Changes the default generation parameters (validated; unknown keys rejected).

        Returns:
            The new defaults.

        Raises:
            InvalidParameterError: an unknown key or an invalid value.
        """
        self._generation = self._generation.updated(**params)
        return self._generation

    @property
    def generation_config(self) -> GenerationConfig:
        return self._generation

    def optimize_for_gpu(self, use_quantization: bool | None = None,
                         load_in_8bit: bool | None = None, load_in_4bit: bool | None = None,
                         n_gpu_layers: int | None = None) -> None:
        """Chooses which file of the model folder to load and how many layers to offload.

        In GGUF terms, 8-bit prefers the ``Q8_0`` file and 4-bit the ``Q4_K_M``
        file of the folder. Takes effect at the next load: a loaded model is
        unloaded (with a log line) when the choice changes it.
        """
        changes = {k: v for k, v in dict(use_quantization=use_quantization,
                                         load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                                         n_gpu_layers=n_gpu_layers).items() if v is not None}
        updated = load_settings(**{**self.settings.model_dump(), **changes})
        if updated != self.settings and self._engine is not None:
            logger.warning("GPU settings changed: the model reloads at the next call")
            self._close_engine()
        self.settings = updated

    def _prepare(self, turns: Sequence[Turn], params: dict[str, Any]) -> tuple[Engine, Any, GenerationConfig]:
        cfg = self._generation.updated(**params)
        engine = self._ensure_engine()
        prompt = engine.prompts.build(turns, cfg)
        engine.check_budget(prompt, cfg)
        return engine, prompt, cfg

    @staticmethod
    def _question_turns(question: str, context: str | None) -> list[Turn]:
        if not isinstance(question, str) or not question.strip():
            raise InvalidParameterError("question must be a non-empty string", "question")
        if context is not None and not isinstance(context, str):
            raise InvalidParameterError("context must be a string or None", "context")
        return [Turn("user", rag_user_message(question, context))]

    # -- generation: sync ----------------------------------------------------

    def chat_stream(self, turns: Sequence[Turn], **params: Any) -> Iterator[Chunk]:
        """Streams the reply to a conversation whose last turn is the user's."""
        engine, prompt, cfg = self._prepare(turns, params)
        return engine.stream(prompt, cfg)

    def stream(self, question: str, context: str | None = None, **params: Any) -> Iterator[Chunk]:
        """Streams the answer as chunks (answer text on channel ``final``).

        Args:
            question: the user's question.
            context: retrieved passages (RAG), or None.
            **params: generation parameters for this call (``max_tokens``,
                ``temperature``, ``top_p``, ``top_k``, ``reasoning_effort``...).

        Raises:
            InvalidParameterError, ContextLengthExceededError: before decoding.
        """
        return self.chat_stream(self._question_turns(question, context), **params)

    def answer(self, question: str, context: str | None = None, **params: Any) -> Answer:
        """The whole answer, with the reasoning apart and how generation ended."""
        return Answer.from_chunks(self.stream(question, context, **params))

    def generate_answer(self, question: str, context: str | None = None,
                        max_tokens: int | None = None, temperature: float | None = None,
                        **params: Any) -> str:
        """The answer text (the ``final`` channel only). See :meth:`stream`."""
        return self.answer(question, context, max_tokens=max_tokens, temperature=temperature,
                           **params).text

    # -- generation: async ---------------------------------------------------

    async def achat_stream(self, turns: Sequence[Turn], **params: Any) -> AsyncIterator[Chunk]:
        """Async twin of :meth:`chat_stream`: the decode loop runs in a worker thread.

        Leaving the ``async for`` early (or cancelling the task) stops decoding
        at the next token and frees the model.
        """
        if self._engine is None:
            await self.load_model()
        engine, prompt, cfg = self._prepare(turns, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancel.set()

        def produce() -> None:
            try:
                for chunk in engine.stream(prompt, cfg, cancel):
                    put(chunk)
            except BaseException as exc:  # handed to the consumer, raised there
                put(_Failure(exc))
            finally:
                put(_DONE)

        threading.Thread(target=produce, name="ggufllm-decode", daemon=True).start()
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            cancel.set()

    async def astream(self, question: str, context: str | None = None,
                      **params: Any) -> AsyncIterator[Chunk]:
        """Async twin of :meth:`stream`."""
        turns = self._question_turns(question, context)
        async for chunk in self.achat_stream(turns, **params):
            yield chunk

    async def aanswer(self, question: str, context: str | None = None, **params: Any) -> Answer:
        """Async twin of :meth:`answer`."""
        return Answer.from_chunks([c async for c in self.astream(question, context, **params)])

    async def generate_answer_with_streaming(self, question: str, context: str | None = None,
                                             max_tokens: int | None = None,
                                             temperature: float | None = None,
                                             **params: Any) -> AsyncIterator[str]:
        """Yields the answer text (``final`` channel) as it is generated."""
        async for chunk in self.astream(question, context, max_tokens=max_tokens,
                                        temperature=temperature, **params):
            if chunk.channel == "final" and chunk.text:
                yield chunk.text

    # -- memory and info -----------------------------------------------------

    def clear_gpu_cache(self) -> None:
        """Empties the KV cache (on the GPU when layers are offloaded)."""
        if self._engine is not None:
            self._engine.clear_cache()

    def get_model_info(self) -> dict[str, Any]:
        """Facts about the model and the device, as the seed service reported them.

        GB figures are 0 on a CPU-only build.
        """
        engine, resolved = self._engine, self._resolved
        gpu = gpu_info()
        info: dict[str, Any] = {
            "loaded": engine is not None,
            "model_name": None, "model_path": None, "architecture": None,
            "quantization": None, "n_ctx": self.settings.max_length,
            "n_gpu_layers": 0,
            "device": gpu.device, "gpu_name": gpu.name,
            "gpu_memory_total": gpu.memory_total_gb,
            "gpu_memory_allocated": gpu.memory_used_gb,
        }
        if engine is not None and self._load_report is not None:  # as llama.cpp reported it
            info.update(self._load_report.as_info())
        if engine is not None and resolved is not None:
            meta = engine.summary.metadata
            file_type = meta.get("general.file_type")
            info.update(
                model_name=meta.get("general.name") or resolved.path.stem,
                model_path=str(resolved.path), architecture=engine.summary.architecture,
                quantization=_quantization_name(resolved.path, file_type),
                n_ctx=engine.n_ctx, n_params=engine.model.n_params,
                model_size_gb=round(engine.model.size_bytes / 1e9, 3),
                prompt_format=engine.prompt_kind.value, source=resolved.source,
            )
        return info

    # -- lifecycle -----------------------------------------------------------

    def _close_engine(self) -> None:
        engine, self._engine, self._resolved = self._engine, None, None
        if engine is not None:
            engine.close()

    def close(self) -> None:
        """Frees the model; further calls raise :class:`ServiceClosedError`."""
        with self._load_lock:
            self._closed = True
            self._close_engine()

    async def cleanup(self) -> None:
        """Async :meth:`close` (waits for a running generation in a worker thread)."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> LLMService:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> LLMService:
        await self.load_model()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cleanup()


def _quantization_name(path: Path, file_type: Any) -> str:
    named = quantization_of(path)
    if named != "unknown" or file_type is None:
        return named
    try:
        from gguf import LlamaFileType

        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {file_type}"
