"""Opening a model: resolve the path, place the layers, build the engine, observe the load."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .config import Settings
from .engine import Engine, EngineOptions
from .engine.native import ProgressFn
from .errors import EngineFailedError, LoadCancelledError
from .gpu.placement import LoadReport, observe_load, placement_for_settings
from .resolve import ResolvedModel, resolve_model

__all__ = ["open_engine", "engine_options"]

logger = logging.getLogger(__name__)


def open_engine(model_path: str | None, settings: Settings, cancel: threading.Event,
                user_progress: ProgressFn | None,
                on_failure: Callable[[EngineFailedError], None] | None = None,
                ) -> tuple[Engine, ResolvedModel, LoadReport]:
    """Loads the model ``model_path`` (or the one the settings name) into a new engine.

    ``cancel`` stops the load at its next progress report (or before it starts);
    ``user_progress`` receives 0..1 and may return False to cancel; ``on_failure`` is
    the engine's (see :class:`~ggufllm.engine.Engine`).

    Raises:
        ModelNotFoundError, ModelLoadError, LoadCancelledError, ConfigError.
    """
    s = settings
    resolved = resolve_model(model_path, env_path=s.llm_model_path,
                             use_quantization=s.use_quantization,
                             load_in_8bit=s.load_in_8bit, load_in_4bit=s.load_in_4bit)

    def on_progress(fraction: float) -> bool:
        if cancel.is_set():
            return False
        return user_progress(fraction) is not False if user_progress else True

    placement = placement_for_settings(s, resolved.path)  # resolves N_GPU_LAYERS=auto
    if cancel.is_set():
        raise LoadCancelledError(str(resolved.path))
    with observe_load() as report:  # what llama.cpp placed where, from its log
        engine = Engine(str(resolved.path), engine_options(s, placement), on_progress,
                        on_failure)
    logger.info("loaded %s (%s prompts, n_ctx=%d, %d slots)", resolved.path,
                engine.prompt_kind.value, engine.n_ctx, s.n_parallel)
    return engine, resolved, report


def engine_options(s: Settings, placement: Any) -> EngineOptions:
    """The engine's options from the settings and the layer placement."""
    return EngineOptions(
        n_ctx=s.max_length, n_gpu_layers=placement.n_gpu_layers, n_threads=s.n_threads,
        n_batch=s.n_batch, flash_attn=s.flash_attn, n_parallel=s.n_parallel,
        max_queue=s.max_queue, kv_cache_type=s.kv_cache_type,
        kv_cache_tokens=s.kv_cache_tokens, swa_full=s.swa_full,
        kv_cache_ram_mb=s.kv_cache_ram_mb, cpu_moe=placement.cpu_moe,
        n_cpu_moe=placement.n_cpu_moe, cpu_extra_buffers=s.cpu_extra_buffers,
        current_date=s.current_date, kv_reuse=s.kv_reuse)
