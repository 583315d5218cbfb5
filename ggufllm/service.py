"""LLMService: the public API, compatible with the service ggufllm replaces.

Every call becomes one request to the engine's scheduler thread (the only code
that touches the llama.cpp context); requests from many threads or tasks are
decoded together:

- :meth:`LLMService.stream` returns an iterator of chunks (sync);
- :meth:`LLMService.answer` / :meth:`generate_answer` fold them into an answer;
- :meth:`LLMService.astream` / :meth:`generate_answer_with_streaming` receive the
  same chunks on the event loop (``call_soon_threadsafe``, no thread per request).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .chunks import Answer, Chunk
from .config import GenerationConfig, Settings, load_settings
from .engine import Engine
from .engine.fit import RagQuestion, fit_prompt, fit_raw
from .engine.native import ProgressFn
from .engine.prompt import Prompt, PromptKind
from .engine.scheduler import ProgressCallback
from .engine.streams import ChunkStream, async_chunks, async_sink
from .engine_health import EngineHealth
from .errors import (
    ConfigError,
    EngineFailedError,
    IncompleteAnswerError,
    InvalidParameterError,
    ServiceClosedError,
)
from .gpu.placement import LoadReport
from .harmony import DEFAULT_INSTRUCTIONS, Turn
from .harmony.constrain import response_format_section
from .loading import open_engine
from .model_info import model_info
from .resolve import ResolvedModel
from .structured import ResponseFormat
from .structured.tools import tool_choice_of, tools_of

__all__ = ["LLMService"]

logger = logging.getLogger(__name__)


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
        unknown = sorted(set(overrides) - set(Settings.model_fields))
        if unknown:  # the environment may carry other names; an explicit keyword may not
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}; known settings are "
                              f"the fields of ggufllm.Settings", unknown[0])
        self.settings = settings if settings is not None else load_settings(**overrides)
        self.model_path = str(model_path) if model_path is not None else None
        self._generation: GenerationConfig = self.settings.generation()
        self._progress = progress
        self._engine: Engine | None = None
        self._resolved: ResolvedModel | None = None
        self._load_report: LoadReport | None = None
        # the three above change together; held only to swap them, never across a load
        self._swap_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._cancel_load = threading.Event()
        self._closed = False
        self.health = EngineHealth()

    # -- loading -------------------------------------------------------------

    def load(self, progress: ProgressFn | None = None) -> None:
        """Loads the model (blocking). A no-op when it is already loaded.

        A :meth:`cancel_load` that comes before the load starts cancels it too.

        Raises:
            ModelNotFoundError, ModelLoadError, LoadCancelledError, ServiceClosedError,
            ConfigError (settings that cannot make a context).
        """
        with self._load_lock:
            try:
                self._check_open()
                if self._engine is not None and self._engine.failure is not None:
                    self._engine.close()  # failed and not yet recovered: load a new one
                    self._engine = None
                if self._engine is None:
                    self.health.reset()
                    self._load(progress or self._progress)
            finally:
                self._cancel_load.clear()  # a cancel is consumed by the load it stopped

    def _load(self, user_progress: ProgressFn | None) -> None:
        loaded = open_engine(self.model_path, self.settings, self._cancel_load, user_progress,
                             self._on_engine_failure)
        with self._swap_lock:
            self._engine, self._resolved, self._load_report = loaded

    def _on_engine_failure(self, failure: EngineFailedError) -> None:
        """From the failed engine's scheduler thread: reload in another thread."""
        engine = self._engine
        if engine is not None and engine.failure is failure:
            threading.Thread(target=self._recover, args=(engine,), daemon=True,
                             name="ggufllm-recover").start()

    def _recover(self, engine: Engine) -> None:
        """Replaces a failed engine by a new load, within :class:`EngineHealth`'s bound."""
        with self._load_lock:
            if self._engine is not engine or self._closed:
                return  # recovered already, or closed
            self._engine = None
            engine.close()  # its scheduler already freed the native memory
            reason = engine.failure.reason if engine.failure else "unknown"
            if not self.health.failed(reason):
                logger.error("the engine stopped on an error (%s); %s", reason,
                             self.health.gave_up())
                return
            logger.warning("the engine stopped on an error (%s); reloading the model", reason)
            try:
                self._load(None)
            except Exception as exc:
                self.health.reload_failed(f"{type(exc).__name__}: {exc}")
                logger.error("reloading the model failed: %s", exc)
                return
            self.health.reloaded()

    async def load_model(self, progress: ProgressFn | None = None) -> None:
        """Loads the model in a worker thread, without blocking the event loop."""
        await asyncio.to_thread(self.load, progress)

    def cancel_load(self) -> None:
        """Cancels a load in progress, or the next one (it raises :class:`LoadCancelledError`)."""
        self._cancel_load.set()

    @property
    def is_loaded(self) -> bool:
        """A model is loaded and its engine runs (False while a failed one reloads)."""
        engine = self._engine
        return engine is not None and engine.failure is None

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceClosedError("this LLMService was cleaned up; create a new one")

    def _ensure_engine(self) -> Engine:
        """The running engine; loads the model on first use, waits for a reload.

        Raises:
            EngineFailedError: the engine failed more often than the reload bound allows.
        """
        self._check_open()
        engine = self._engine
        if engine is not None and engine.failure is not None:
            self._recover(engine)  # or wait for the recovery already under way
            engine = self._engine
        if engine is None:
            with self._load_lock:  # a recovery may hold it: its outcome decides
                self._check_open()
                if self._engine is None:
                    if self.health.state == "failed":
                        raise EngineFailedError(self.health.last_failure or "unknown",
                                                self.health.gave_up())
                    try:
                        self._load(self._progress)
                    finally:
                        self._cancel_load.clear()  # consumed by the load it stopped
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
        self._generation = self._generation.updated(**_with_format(params))
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
        unloaded (with a log line) when the choice changes it; a load under way is
        waited for, so the choice also applies to the model that load leaves.
        """
        changes = {k: v for k, v in dict(use_quantization=use_quantization,
                                         load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                                         n_gpu_layers=n_gpu_layers).items() if v is not None}
        with self._load_lock:  # a load under way reads the settings: change them after it
            updated = load_settings(**{**self.settings.model_dump(), **changes})
            if updated != self.settings and self._engine is not None:
                logger.warning("GPU settings changed: the model reloads at the next call")
                self._close_engine()
            self.settings = updated

    def _prepare(self, turns: Sequence[Turn], params: dict[str, Any], instructions: str | None,
                 rag: RagQuestion | None = None) -> tuple[Engine, Prompt, GenerationConfig]:
        params = _with_tools(_with_format(params))
        cfg = self._generation.updated(**params)
        if instructions is not None and not isinstance(instructions, str):
            raise InvalidParameterError("instructions must be a string or None", "instructions")
        engine = self._ensure_engine()
        if cfg.response_format is not None:
            turns, instructions = _show_format(engine, cfg.response_format, turns, instructions)
        # no max_tokens: the default budget, capped to what the window leaves (engine/fit.py)
        prompt, cfg = fit_prompt(engine, turns, cfg, instructions, rag,
                                 budget_given=params.get("max_tokens") is not None)
        return engine, prompt, cfg

    @staticmethod
    def _rag(question: str, context: str | None) -> RagQuestion:
        if not isinstance(question, str) or not question.strip():
            raise InvalidParameterError("question must be a non-empty string", "question")
        if context is not None and not isinstance(context, str):
            raise InvalidParameterError("context must be a string or None", "context")
        return RagQuestion(question, context)

    # -- generation: sync ----------------------------------------------------

    def chat_stream(self, turns: Sequence[Turn], *, instructions: str | None = None,
                    on_prompt_progress: ProgressCallback | None = None,
                    tools: Sequence[Any] | None = None, tool_choice: Any = None,
                    **params: Any) -> ChunkStream:
        """Streams the reply to a conversation whose last turn is the user's (or a tool's
        result).

        See :meth:`stream`; ``overflow="drop_oldest_turns"`` drops the oldest turns
        of a conversation that outgrew the window (the stream's ``dropped_turns`` says
        how many).

        Args:
            tools: functions the model may call (gpt-oss only): OpenAI's ``{"type":
                "function", "function": {...}}`` objects, :class:`~ggufllm.structured.tools.
                FunctionTool` values or pydantic model classes. A call streams as chunks whose
                ``tool_call`` names it, then adds its arguments, which follow the function's
                schema; the reply then ends with ``finish_reason="tool_call"``. Send the
                result back as ``Turn("tool", result, name=NAME)`` after
                ``Turn("assistant", "", reasoning=..., tool_calls=answer.tool_calls)``.
            tool_choice: ``auto`` (default), ``none``, ``required``, or a function's name
                (or OpenAI's ``{"type": "function", "function": {"name": ...}}``).

        Raises:
            InvalidParameterError: tools for a model without tool support, bad tools.
            UnsupportedSchemaError: a function's parameters use what the grammar cannot
                express.
        """
        params = {**params, "tools": tools, "tool_choice": tool_choice}
        engine, prompt, cfg = self._prepare(turns, params, instructions)
        return engine.stream(prompt, cfg, on_prompt_progress)

    def chat(self, turns: Sequence[Turn], **params: Any) -> Answer:
        """The whole reply to a conversation (:meth:`chat_stream` folded): the answer, the
        reasoning apart, and the ``tool_calls`` it made."""
        with closing(self.chat_stream(turns, **params)) as chunks:
            return Answer.from_chunks(chunks)

    def stream(self, question: str, context: str | None = None, *,
               instructions: str | None = None,
               on_prompt_progress: ProgressCallback | None = None,
               **params: Any) -> Iterator[Chunk]:
        """Streams the answer as chunks (answer text on channel ``final``).

        The request is queued at once and decoded by the scheduler thread, together
        with other requests; close the iterator (or drop it) to cancel it.

        Args:
            question: the user's question.
            context: retrieved passages (RAG), or None. They come before the
                question in the prompt, so follow-up questions reuse their KV cache.
            instructions: developer/system instructions (None: the default).
            on_prompt_progress: called with (prompt tokens evaluated or reused,
                prompt length) after each prompt chunk, from the scheduler thread.
            **params: generation parameters for this call (``max_tokens``,
                ``temperature``, ``top_p``, ``top_k``, ``seed``, ``overflow``...).

        Raises:
            InvalidParameterError, ContextLengthExceededError, ServerBusyError,
            ServiceClosedError: at call time, before any decoding.
        """
        engine, prompt, cfg = self._prepare([], params, instructions, self._rag(question, context))
        return engine.stream(prompt, cfg, on_prompt_progress)

    def complete_stream(self, text: str, *, on_prompt_progress: ProgressCallback | None = None,
                        **params: Any) -> Iterator[Chunk]:
        """Streams a raw continuation of ``text`` (no prompt format, no built-in stops),
        as OpenAI's legacy completions and llama-server's ``/completion`` do.

        Raises:
            InvalidParameterError, ContextLengthExceededError, ServerBusyError,
            ServiceClosedError: at call time, before any decoding.
        """
        engine, prompt, cfg = self._prepare_raw(text, params)
        return engine.stream(prompt, cfg, on_prompt_progress)

    async def acomplete_stream(self, text: str, *,
                               on_prompt_progress: ProgressCallback | None = None,
                               **params: Any) -> AsyncIterator[Chunk]:
        """Async twin of :meth:`complete_stream`."""
        if self._engine is None:
            await self.load_model()
        # tokenizing a long prompt takes seconds: never on the event loop
        engine, prompt, cfg = await asyncio.to_thread(self._prepare_raw, text, params)
        async for chunk in self._astream_prompt(engine, prompt, cfg, on_prompt_progress):
            yield chunk

    def _prepare_raw(self, text: str, params: dict[str, Any]) -> tuple[Engine, Prompt, GenerationConfig]:
        if not isinstance(text, str) or not text:
            raise InvalidParameterError("the prompt must be a non-empty string", "prompt")
        if params.get("response_format") is not None:
            raise InvalidParameterError("response_format needs a question or a conversation; a "
                                        "raw continuation cannot take one", "response_format")
        cfg = self._generation.updated(**params)
        engine = self._ensure_engine()
        prompt, cfg = fit_raw(engine, text, cfg, budget_given=params.get("max_tokens") is not None)
        return engine, prompt, cfg

    def answer(self, question: str, context: str | None = None, **params: Any) -> Answer:
        """The whole answer, with the reasoning apart and how generation ended."""
        with closing(self.stream(question, context, **params)) as chunks:
            return Answer.from_chunks(chunks)

    def generate_answer(self, question: str, context: str | None = None,
                        max_tokens: int | None = None, temperature: float | None = None,
                        *, response_format: Any = None, **params: Any) -> Any:
        """The answer text (the ``final`` channel only). See :meth:`stream`.

        Args:
            response_format: a structured answer: a JSON Schema dict (the answer is JSON text
                that matches it) or a pydantic model class (the answer is an instance of it,
                validated); OpenAI's ``{"type": "json_object"}`` / ``{"type": "json_schema",
                "json_schema": {...}}`` are taken too. gpt-oss reasons first, within
                ``max_tokens`` (``reasoning_budget`` bounds it further).

        Returns:
            The text, or an instance of the ``response_format`` model class.

        Raises:
            UnsupportedSchemaError: the schema uses what the answer's grammar cannot express.
            IncompleteAnswerError: a structured answer was cut by ``max_tokens``.
        """
        answer = self.answer(question, context, max_tokens=max_tokens, temperature=temperature,
                             response_format=response_format, **params)
        return _parsed(answer, response_format)

    # -- generation: async ---------------------------------------------------

    async def achat_stream(self, turns: Sequence[Turn], *, instructions: str | None = None,
                           on_prompt_progress: ProgressCallback | None = None,
                           tools: Sequence[Any] | None = None, tool_choice: Any = None,
                           **params: Any) -> AsyncIterator[Chunk]:
        """Async twin of :meth:`chat_stream`; errors are raised at the first ``__anext__``.

        Leaving the ``async for`` early (or cancelling the task) cancels the
        request at the scheduler's next step.
        """
        params = {**params, "tools": tools, "tool_choice": tool_choice}
        async for chunk in self._astream(turns, params, instructions, on_prompt_progress):
            yield chunk

    async def _astream(self, turns: Sequence[Turn], params: dict[str, Any],
                       instructions: str | None, on_prompt_progress: ProgressCallback | None,
                       rag: RagQuestion | None = None) -> AsyncIterator[Chunk]:
        if self._engine is None:
            await self.load_model()
        # building and tokenizing a long prompt takes seconds: never on the event loop
        engine, prompt, cfg = await asyncio.to_thread(self._prepare, turns, params,
                                                      instructions, rag)
        async for chunk in self._astream_prompt(engine, prompt, cfg, on_prompt_progress):
            yield chunk

    @staticmethod
    async def _astream_prompt(engine: Engine, prompt: Prompt, cfg: GenerationConfig,
                              on_prompt_progress: ProgressCallback | None) -> AsyncIterator[Chunk]:
        cancel = threading.Event()
        sink, queue = async_sink(cancel)
        engine.submit(prompt, cfg, sink, on_prompt_progress, cancel)
        async for chunk in async_chunks(queue, cancel):
            yield chunk

    async def astream(self, question: str, context: str | None = None, *,
                      instructions: str | None = None,
                      on_prompt_progress: ProgressCallback | None = None,
                      **params: Any) -> AsyncIterator[Chunk]:
        """Async twin of :meth:`stream`."""
        rag = self._rag(question, context)
        async for chunk in self._astream([], params, instructions, on_prompt_progress, rag):
            yield chunk

    async def aanswer(self, question: str, context: str | None = None, **params: Any) -> Answer:
        """Async twin of :meth:`answer`."""
        chunks = self.astream(question, context, **params)
        try:
            return Answer.from_chunks([c async for c in chunks])
        finally:
            await chunks.aclose()

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

    def warm(self, context: str, *, instructions: str | None = None) -> int:
        """Evaluates and keeps the prompt prefix every question over ``context`` shares
        (a desktop app warms the open document before the first question).

        Returns:
            How many prompt tokens that prefix has.

        Raises:
            InvalidParameterError, ContextLengthExceededError: as for a question.
        """
        greedy = {"max_tokens": 1, "temperature": 0.0}
        engine, a, cfg = self._prepare([], greedy, instructions, self._rag("?", context))
        b = self._prepare([], greedy, instructions, self._rag("!", context))[1].tokens
        n = next((i for i, (x, y) in enumerate(zip(a.tokens, b, strict=False)) if x != y),
                 min(len(a.tokens), len(b)))
        with closing(engine.stream(Prompt(a.tokens[:n], ()), cfg)) as chunks:
            for _ in chunks:  # one token is generated; the prefix stays in its slot
                pass
        return n

    def save_kv_cache(self, path: str | Path) -> int:
        """Writes every cached prompt prefix (tokens and KV state: the RAM cache and the
        idle slots) to ``path`` atomically, mode 0600, signed with this user's key
        (``$XDG_CACHE_HOME/ggufllm/kv-key``, made on first use).

        Returns:
            How many prefixes the file holds.

        Raises:
            OSError: the file could not be written (an existing file is unchanged).
        """
        return self._ensure_engine().save_kv_cache(str(path))

    def load_kv_cache(self, path: str | Path, *, trusted: bool = False) -> int:
        """Reads prefixes saved by :meth:`save_kv_cache`, in this or another process; a
        later prompt that starts with one reuses it instead of evaluating it.

        Args:
            path: the file.
            trusted: accept a file written under another user's key (another machine
                or account). Its tokens are taken to match its KV state unchecked, so
                pass it only for files from a source you trust.

        Returns:
            How many of the file's prefixes the RAM cache holds after the load: the
            newest that fit ``KV_CACHE_RAM_MB`` (a warning says when some do not).

        Raises:
            KVCacheMismatchError: the file is for another model, llama.cpp build,
                setting (``MAX_LENGTH``, ``N_PARALLEL``, ``KV_CACHE_TYPE``, ...) or format.
            KVCacheUntrustedError: the file was not written under this user's key, and
                ``trusted`` is False.
            KVCacheError: the file is missing, truncated or corrupt.
        """
        return self._ensure_engine().load_kv_cache(str(path), trusted=trusted)

    def clear_kv_cache(self) -> int:
        """Drops the prefixes cached in idle slots and in RAM (running requests keep theirs).

        Returns:
            How many cached tokens were dropped.
        """
        engine = self._engine
        return engine.clear_cache() if engine is not None else 0

    def clear_gpu_cache(self) -> None:
        """Empties the KV cache (on the GPU when layers are offloaded): :meth:`clear_kv_cache`."""
        self.clear_kv_cache()

    def get_model_info(self) -> dict[str, Any]:
        """Facts about the model and the device, as the seed service reported them.

        GB figures are 0 on a CPU-only build. Once loaded, ``kv_cache`` says what the
        KV cache holds and costs (``n_ctx`` per request, ``n_ctx_pool`` cells in all,
        ``n_parallel`` slots, ``bytes``, ``hits``/``misses``, ``tokens_reused`` vs
        ``tokens_evaluated``, ``tokens_in_use``, ``prefixes_in_slots``, the RAM cache's
        ``ram_entries``/``ram_bytes``/``ram_hits``...), ``scheduler`` how many requests
        run and wait, and ``cpu_extra_buffers`` what the CPU kernel self-test decided
        (``mode``, ``status``, ``reason``, ``use_extra_buffers``, ``buffers_in_use``...),
        and ``engine`` its health (``state`` ok / reloading / failed, ``failures``,
        ``reloads``, ``last_failure``).
        """
        with self._swap_lock:  # one load's engine, file and report, never two loads' mixed
            engine, resolved, report = self._engine, self._resolved, self._load_report
        info = model_info(self.settings.max_length, engine, resolved, report)
        info["engine"] = self.health.as_info()
        if engine is not None and engine.failure is not None:
            info["loaded"] = False
            info["engine"]["state"] = "failed" if self.health.state == "failed" else "reloading"
        return info

    # -- lifecycle -----------------------------------------------------------

    def _close_engine(self) -> None:
        with self._swap_lock:
            engine, self._engine, self._resolved = self._engine, None, None
        if engine is not None:
            engine.close()

    def close(self) -> None:
        """Cancels running and waiting requests (they end with reason ``cancelled``),
        then frees the model; further calls raise :class:`ServiceClosedError`."""
        with self._load_lock:
            self._closed = True
            self._close_engine()

    def unload(self) -> None:
        """Frees the model but keeps the service usable: the next call (or
        :meth:`load`) loads it again. Running requests end with ``cancelled``."""
        with self._load_lock:
            self._close_engine()

    async def cleanup(self) -> None:
        """Async :meth:`unload`, as the seed's service had it: frees the model (in a worker
        thread) and a later ``await load_model()`` loads it again. :meth:`close` is final."""
        await asyncio.to_thread(self.unload)

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


def _with_format(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``response_format`` in its one form (checked: a schema the grammar
    cannot express raises :class:`~ggufllm.errors.UnsupportedSchemaError` here)."""
    if params.get("response_format") is None:
        return params
    return {**params, "response_format": ResponseFormat.of(params["response_format"])}


def _with_tools(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``tools`` and ``tool_choice`` in their one form (checked: a parameter
    schema the grammar cannot express raises here)."""
    params = dict(params)
    tools, tool_choice = params.pop("tools", None), params.pop("tool_choice", None)
    if tools is None and tool_choice is None:
        return params
    checked = tools_of(tools)
    return {**params, "tools": checked, "tool_choice": tool_choice_of(tool_choice, checked)}


def _show_format(engine: Engine, fmt: ResponseFormat, turns: Sequence[Turn],
                 instructions: str | None) -> tuple[list[Turn], str | None]:
    """Shows the model the schema its answer follows: gpt-oss in its developer message's
    ``# Response Formats`` section, as harmony lays it out; other models in their
    instructions. An instruction turn, first, so that it joins the instructions."""
    if engine.prompt_kind is PromptKind.HARMONY:
        text = response_format_section(fmt.name, fmt.schema_text(), fmt.description)
        if instructions is None and not any(t.role in ("system", "developer") for t in turns):
            instructions = DEFAULT_INSTRUCTIONS
    else:
        text = f"Answer with JSON only, matching this JSON Schema: {fmt.schema_text()}"
    return [Turn("developer", text), *turns], instructions


def _parsed(answer: Answer, response_format: Any) -> Any:
    """The answer's text, or for a pydantic model class an instance of it."""
    if not (isinstance(response_format, type) and issubclass(response_format, BaseModel)):
        return answer.text
    if answer.finish_reason != "stop":
        raise IncompleteAnswerError(answer.text, answer.finish_reason)
    return response_format.model_validate_json(answer.text)
