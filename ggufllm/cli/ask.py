"""``ggufllm ask``: one answer, streamed to stdout."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import click

from ..chunks import Answer
from ..config import GenerationConfig
from ..errors import InvalidParameterError, KVCacheError
from ..harmony import Turn, rag_user_message
from ..service import LLMService
from .common import (
    CliError,
    Flags,
    flags_from,
    generation_options,
    quiet,
    read_json,
    read_text,
    state,
    verbose,
)
from .load import call_options, open_service
from .output import Streamed, after_answer, stream_to_terminal
from .progress import PromptSpinner, is_terminal
from .tools import Echo, ToolSetup, converse, print_calls, tool_options, tool_setup_from

__all__ = ["ask", "read_text"]


def _inputs(question: str | None, context: str | None, context_file: str | None) -> tuple[str, str | None]:
    """The question and the context, from arguments, files or stdin."""
    if context is not None and context_file is not None:
        raise CliError("give --context or --context-file, not both")
    stdin_used = context_file == "-"
    if context_file is not None:
        name = "stdin" if stdin_used else f"--context-file {context_file}"
        try:
            if stdin_used:
                context = read_text(sys.stdin.buffer, name)
            else:
                with open(context_file, "rb") as f:
                    context = read_text(f, name)
        except OSError as exc:
            raise CliError(f"--context-file {context_file}: {exc.strerror}") from None
    if question is None and not sys.stdin.isatty() and not stdin_used:
        question = "-"
    if question == "-":
        if stdin_used:
            raise CliError("stdin cannot hold both the question and --context-file -")
        question = read_text(sys.stdin.buffer, "stdin")
    if question is None or not question.strip():
        raise InvalidParameterError("the question is empty: give it as an argument, or `-` to "
                                    "read it from stdin", "question")
    state().has_context = bool(context)
    return question.strip(), context


@click.command()
@click.argument("question", required=False)
@click.option("--context", default=None, help="Retrieved passages to answer from.")
@click.option("--context-file", default=None, metavar="PATH",
              help="Read the context from a UTF-8 file ('-' for stdin).")
@generation_options
@click.option("--overflow", type=click.Choice(["error", "truncate-context", "shrink-max-tokens"]),
              default=None, help="When the prompt does not fit the window: fail, cut the context, "
                                 "or lower --max-tokens [default: error].")
@click.option("--no-stream", is_flag=True, help="Print the answer when it is complete.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--kv-cache", "kv_cache", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="A KV-cache file: loaded when it exists, saved after the answer.")
@click.option("--json-schema", "json_schema", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="Answer with JSON that matches the JSON Schema in FILE (gpt-oss reasons "
                   "first; the reasoning never enters the answer).")
@tool_options
def ask(question: str | None, context: str | None, context_file: str | None, model: str | None,
        system: str | None, show_reasoning: bool, stats: bool, no_stream: bool, as_json: bool,
        kv_cache: Path | None, json_schema: Path | None, **kw: Any) -> None:
    """Answer QUESTION, optionally from retrieved context.

    QUESTION '-' (or none, with a pipe) reads the question from stdin.

    \b
    Examples:
      ggufllm ask "What is the capital of France?" --stats
      ggufllm ask "Where is the festival held?" --context-file notes.txt
      cat notes.txt | ggufllm ask "Summarize this." --context-file -
      echo "Who wrote Hamlet?" | ggufllm ask -
      ggufllm ask "Extract the city and year." --context-file notes.txt --json-schema city.json
      ggufllm ask "Weather in Paris?" --tools tools.json --tool-exec "python3 tool.py"
    """
    if kw.get("overflow"):
        kw["overflow"] = kw["overflow"].replace("-", "_")
    question, context = _inputs(question, context, context_file)
    flags = flags_from(kw)
    setup = tool_setup_from(kw, overflow=flags.params.get("overflow"), has_context=bool(context))
    if json_schema is not None:
        flags.params["response_format"] = _read_schema(json_schema)
    service, cfg = open_service(model, flags, needs_tools=setup is not None)
    with service:
        save_to = _load_kv_cache(service, kv_cache) if kv_cache is not None else None
        if setup is None:
            _answer(service, question, context, system, flags, cfg,
                    show_reasoning=show_reasoning, stats=stats, no_stream=no_stream,
                    as_json=as_json)
        else:
            _answer_with_tools(service, setup, question, context, system, flags, cfg,
                               show_reasoning=show_reasoning, stats=stats, no_stream=no_stream,
                               as_json=as_json)
        if save_to is not None:
            service.save_kv_cache(save_to)


def _read_schema(path: Path) -> Any:
    """The JSON Schema of ``--json-schema FILE`` (checked: an unsupported keyword is refused).

    Raises:
        CliError: the file cannot be read or is not a JSON object.
    """
    from ..structured import ResponseFormat

    schema = read_json(path, "--json-schema")
    if not isinstance(schema, dict):
        raise CliError(f"--json-schema {path} must hold a JSON object (a JSON Schema)")
    # checked here: an unsupported keyword fails before the model loads
    return ResponseFormat.of({"type": "json_schema", "json_schema": {
        "name": path.stem or "response", "schema": schema}})


def _load_kv_cache(service: LLMService, path: Path) -> Path | None:
    """Loads ``--kv-cache FILE`` when it exists. Returns where to save the cache after the
    answer: the file, unless saving would lose what it holds (a load that failed, or one
    that left prefixes out: they are kept on disk, and the notice says so)."""
    if not path.exists():
        return path
    try:
        service.load_kv_cache(path)
    except KVCacheError as exc:
        if not quiet():
            click.echo(f"notice: {exc}; answering without it ({path} is left unchanged)",
                       err=True)
        return None
    if service.get_model_info()["kv_cache"]["ram_load_skipped"]:
        if not quiet():
            click.echo(f"notice: {path} holds more prefixes than the RAM cache "
                       f"(KV_CACHE_RAM_MB={service.settings.kv_cache_ram_mb}); it is left "
                       "unchanged: raise KV_CACHE_RAM_MB to use all of it, or delete it",
                       err=True)
        return None
    return path


def _answer(service: LLMService, question: str, context: str | None, system: str | None,
            flags: Flags, cfg: GenerationConfig, *, show_reasoning: bool, stats: bool, no_stream: bool,
            as_json: bool) -> None:
    if as_json or no_stream:
        extra = call_options(system, None)
        answer = service.answer(question, context, **flags.params, **extra)
        _print_whole(answer, service, as_json, show_reasoning)
        if not as_json:
            after_answer(Streamed(answer, None, False), max_tokens=cfg.max_tokens,
                         stats=stats or verbose() > 0, quiet=quiet())
        return
    spinner = PromptSpinner(enabled=is_terminal() and not quiet())
    extra = call_options(system, spinner)
    started = time.perf_counter()
    spinner.start()
    try:
        chunks = service.stream(question, context, **flags.params, **extra)
        streamed = stream_to_terminal(chunks, show_reasoning, started=started,
                                      on_first=spinner.stop)
    finally:
        spinner.stop()
    after_answer(streamed, max_tokens=cfg.max_tokens, stats=stats or verbose() > 0,
                 quiet=quiet())


def _answer_with_tools(service: LLMService, setup: ToolSetup, question: str, context: str | None,
                       system: str | None, flags: Flags, cfg: GenerationConfig, *,
                       show_reasoning: bool, stats: bool, no_stream: bool, as_json: bool) -> None:
    """A tool conversation (``cli/tools.py``). Its first user turn is the one
    :meth:`LLMService.answer` builds for gpt-oss: the context, then the question."""
    echo = Echo.OFF if as_json else Echo.WHOLE if no_stream else Echo.LIVE
    after = None if as_json else partial(after_answer, max_tokens=cfg.max_tokens,
                                         stats=stats or verbose() > 0, quiet=quiet())
    talk = converse(service, setup, [Turn("user", rag_user_message(question, context))],
                    flags.params, instructions=system, echo=echo,
                    show_reasoning=show_reasoning and not as_json, after=after)
    if as_json:
        _print_whole(talk.answer, service, True, False, talk.record())
    elif setup.command is None:
        print_calls(talk.answer)


def _print_whole(answer: Answer, service: LLMService, as_json: bool, show_reasoning: bool,
                 extra: dict[str, Any] | None = None) -> None:
    if as_json:
        info = service.get_model_info()
        click.echo(json.dumps({
            "answer": answer.text, "reasoning": answer.reasoning,
            "finish_reason": answer.finish_reason,
            "timings": asdict(answer.timings) if answer.timings else None,
            "model": info.get("model_path"), **(extra or {}),
        }, ensure_ascii=False))
        return
    if show_reasoning and answer.reasoning:
        click.secho(answer.reasoning, err=True, dim=True)
    click.echo(answer.text)
