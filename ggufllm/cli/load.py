"""From flags to a loaded service: checks that need only the GGUF header come first,
so a mistake is reported before a 12 GB model loads."""

from __future__ import annotations

import logging
from typing import Any

from ..config import GenerationConfig
from ..engine.fit import check_budget
from ..engine.prompt import has_tool_calls, no_tool_calls_error
from ..errors import ContextLengthExceededError, InvalidParameterError
from ..gguf_file import read_gguf_header
from ..resolve import resolve_model
from ..service import LLMService
from .common import CliError, Flags, quiet, state
from .progress import LoadBar, PromptSpinner, is_terminal

__all__ = ["open_service", "call_options"]

logger = logging.getLogger("ggufllm.cli")


def open_service(model: str | None, flags: Flags, *,
                 needs_tools: bool = False) -> tuple[LLMService, GenerationConfig]:
    """Validates the flags, resolves and checks the model file, then loads it.

    Args:
        needs_tools: the call offers functions (``--tools``): a model without tool calls is
            refused from its header, before it loads.

    Returns:
        The loaded service (close it) and the generation parameters of this call.

    Raises:
        ConfigError, InvalidParameterError: a flag or setting is invalid.
        CliError: a ``--max-tokens`` typed leaves no room in the window.
        ModelNotFoundError, ModelLoadError: no usable model.
    """
    settings = flags.settings()
    cfg = flags.generation(settings)
    resolved = resolve_model(model, env_path=settings.llm_model_path,
                             use_quantization=settings.use_quantization,
                             load_in_8bit=settings.load_in_8bit, load_in_4bit=settings.load_in_4bit)
    header = read_gguf_header(resolved.path)
    if needs_tools and not has_tool_calls(header.architecture):
        raise no_tool_calls_error()
    trained = header.context_length
    state().trained_ctx = trained
    typed = state().flags
    ctx_name = "--ctx" if "max_length" in typed else "--ctx (MAX_LENGTH)"
    if trained and settings.max_length > trained and not quiet():
        logger.warning("%s %d is past the %d tokens %s was trained on: answers past that "
                       "length may degrade", ctx_name, settings.max_length, trained,
                       resolved.path.name)
    # only a budget typed can be wrong: the default one (DEFAULT_MAX_TOKENS) is capped to what
    # the window leaves by the service
    if "max_tokens" in typed and not _fits(cfg.max_tokens, settings.max_length):
        raise CliError(f"--max-tokens {cfg.max_tokens} leaves no room for the prompt in the "
                       f"context window of {settings.max_length} tokens ({ctx_name}); use "
                       f"--max-tokens {settings.max_length // 2} or less, or --ctx above {cfg.max_tokens}")
    service = LLMService(resolved.path, settings=settings)
    bar = LoadBar(resolved.path.name, enabled=is_terminal() and not quiet())
    try:
        service.load(progress=bar)
    except BaseException:
        service.close()
        raise
    finally:
        bar.close()
    return service, cfg


def call_options(instructions: str | None, spinner: PromptSpinner | None) -> dict[str, Any]:
    """The keyword arguments a generation call gets from ``--system`` and the spinner."""
    extra: dict[str, Any] = {}
    if instructions:
        extra["instructions"] = instructions
    if spinner is not None:
        extra["on_prompt_progress"] = spinner.progress
    return extra


def _fits(max_tokens: int, n_ctx: int) -> bool:
    """Whether a one-token prompt and ``max_tokens`` fit the window (the engine's budget rule)."""
    try:
        check_budget(1, max_tokens, n_ctx)
    except (ContextLengthExceededError, InvalidParameterError):
        return False
    return True
