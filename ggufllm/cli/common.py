"""What the commands share: verbosity, the flag table, errors in the user's words.

Flags override environment defaults *before* validation, so a bad
``DEFAULT_TEMPERATURE`` is no error when ``--temperature`` replaces it, and an
error names what the user typed (``--ctx``, not ``MAX_LENGTH``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click

from ..config import GenerationConfig, Settings, load_settings
from ..errors import (
    ConfigError,
    ContextLengthExceededError,
    GgufllmError,
    InvalidParameterError,
)

__all__ = ["CliError", "verbosity_options", "state", "explain", "generation_options",
           "Flags", "read_text", "read_json"]

# generation parameter -> the flag that sets it
PARAM_FLAGS = {
    "max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p",
    "top_k": "--top-k", "min_p": "--min-p", "repeat_penalty": "--repeat-penalty",
    "seed": "--seed", "reasoning_effort": "--reasoning-effort", "stop": "--stop",
    "overflow": "--overflow",
}
# generation parameter -> the Settings field (environment default) it overrides
PARAM_SETTINGS = {
    "max_tokens": "default_max_tokens", "temperature": "default_temperature",
    "top_p": "default_top_p", "top_k": "default_top_k", "seed": "default_seed",
    "reasoning_effort": "reasoning_effort",
}
SETTING_FLAGS = {"max_length": "--ctx", **{v: PARAM_FLAGS[k] for k, v in PARAM_SETTINGS.items()}}


class CliError(click.ClickException):
    """A command-line mistake, shown as one ``error:`` line (exit 1)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


@dataclass
class Invocation:
    """What one command line said and found, shared by the group and its command.

    Attributes:
        verbose: how many ``-v``.
        quiet: ``-q``.
        flags: setting or parameter name -> the flag that set it (``max_tokens`` -> ``--max-tokens``).
        trained_ctx: the context the model was trained on (once its header was read).
        has_context: the question came with a RAG context (``ask --context``).
        in_chat: the command is the chat REPL.
        in_tools: the answer is a tool conversation (``ask --tools``), whose context
            ``--overflow truncate-context`` cannot cut.
    """

    verbose: int = 0
    quiet: bool = False
    flags: dict[str, str] = field(default_factory=dict)
    trained_ctx: int | None = None
    has_context: bool = False
    in_chat: bool = False
    in_tools: bool = False


def state() -> Invocation:
    """This invocation's facts (a fresh, unshared one outside a click command)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return Invocation()
    return ctx.find_root().meta.setdefault("ggufllm", Invocation())


def setup_logging(verbose: int, quiet: bool) -> None:
    """Notices at WARNING, ``-v`` INFO, ``-vv`` DEBUG with llama.cpp's log; ``-q`` errors only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ggufllm: %(message)s"))
    root = logging.getLogger("ggufllm")
    root.handlers[:] = [handler]
    root.propagate = False
    level = logging.ERROR if quiet else (
        logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    root.setLevel(level)
    # llama.cpp's own warnings are noise for a user unless asked for.
    logging.getLogger("ggufllm.llama_cpp").setLevel(
        logging.DEBUG if verbose > 1 else logging.ERROR)


def _verbosity(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    facts = ctx.find_root().meta.setdefault("ggufllm", Invocation())
    if param.name == "verbose":
        facts.verbose += value or 0
    elif value:
        facts.quiet = True
    setup_logging(facts.verbose, facts.quiet)


def verbosity_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-v``/``-q``, accepted before and after the subcommand alike."""
    fn = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_verbosity,
                      help="Only errors on stderr (no notices, progress or notes).")(fn)
    return click.option("-v", "--verbose", count=True, expose_value=False, callback=_verbosity,
                        help="More on stderr: -v adds --stats and info lines, -vv llama.cpp's "
                             "log.")(fn)


def quiet() -> bool:
    return state().quiet


def verbose() -> int:
    return state().verbose


def explain(exc: GgufllmError) -> str:
    """The one-line message for a known failure, in the words of the flags typed."""
    typed = state().flags
    if isinstance(exc, InvalidParameterError) and exc.name in typed:
        flag = typed[exc.name]
        return f"{flag}: {str(exc).split(': ', 1)[-1]}"
    if isinstance(exc, ConfigError) and exc.field and exc.field.lower() in SETTING_FLAGS:
        flag = SETTING_FLAGS[exc.field.lower()]
        if flag in typed.values():
            return str(exc).replace(f"{exc.field}:", f"{flag}:").replace("invalid setting: ", "")
    if isinstance(exc, ContextLengthExceededError):
        return context_remedies(exc)
    return str(exc)


def context_remedies(exc: ContextLengthExceededError) -> str:
    """Names the numbers and the ways out of a prompt that does not fit."""
    facts = state()
    ctx_flag = "--ctx" if "--ctx" in facts.flags.values() else "--ctx (MAX_LENGTH)"
    n, n_ctx, budget = exc.n_prompt, exc.n_ctx, exc.max_tokens
    fixes = []
    if n < n_ctx:
        fixes.append(f"--max-tokens {n_ctx - n} or less")
    trained = facts.trained_ctx
    need = n + budget
    if trained is None or need <= trained:
        fixes.append(f"--ctx {need} or more" + (f" (the model was trained on {trained})"
                                                 if trained else ""))
    if facts.has_context:
        typed_overflow = "overflow" in facts.flags
        fixes.append("a shorter context" + ("" if typed_overflow or facts.in_tools else
                                            ", or --overflow truncate-context"))
    elif facts.in_chat:
        fixes.append("/clear, or a shorter message")
    else:
        fixes.append("a shorter question")
    return (f"the prompt is {n} tokens and --max-tokens is {budget}: {n + budget} tokens do not "
            f"fit the context window of {n_ctx} ({ctx_flag}); use " + ", ".join(fixes))


def read_text(stream: IO[bytes], what: str) -> str:
    """Reads UTF-8 text (a BOM is dropped).

    Raises:
        CliError: the bytes are not UTF-8 (says where).
    """
    data = stream.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CliError(f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                       f"{exc.start}); convert it first, e.g. `iconv -f latin1 -t utf-8`") from None


def read_json(path: Path, flag: str) -> Any:
    """The JSON value in the UTF-8 file that ``flag`` named.

    Raises:
        CliError: the file cannot be read, is not UTF-8 or not JSON (says which, as
            ``{flag} {path}: ...``).
    """
    try:
        with open(path, "rb") as f:
            return json.loads(read_text(f, f"{flag} {path}"))
    except OSError as exc:
        raise CliError(f"{flag} {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CliError(f"{flag} {path} is not JSON: {exc}") from None


class Flags:
    """The generation and context flags one command was given, checked before any loading.

    Args:
        max_length: ``--ctx`` (None: ``MAX_LENGTH``).
        params: generation parameters given as flags (None values are not given).
    """

    def __init__(self, max_length: int | None, **params: Any) -> None:
        self.max_length = max_length
        self.params = {k: v for k, v in params.items() if v is not None and v != ()}
        typed = {k: PARAM_FLAGS[k] for k in self.params}
        if max_length is not None:
            typed["max_length"] = "--ctx"
        state().flags = typed

    def settings(self) -> Settings:
        """The settings: environment defaults with these flags on top (validated together).

        Raises:
            ConfigError: a value is invalid (named by its flag when a flag set it).
        """
        overrides: dict[str, Any] = {PARAM_SETTINGS[k]: v for k, v in self.params.items()
                                     if k in PARAM_SETTINGS}
        if self.max_length is not None:
            overrides["max_length"] = self.max_length
        return load_settings(**overrides)

    def generation(self, settings: Settings) -> GenerationConfig:
        """The generation parameters of this call, validated.

        Raises:
            InvalidParameterError: a value is invalid (named by its flag).
        """
        return settings.generation().updated(**self.params)


def generation_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The model, window and sampling flags that ``ask`` and ``chat`` share."""
    d = GenerationConfig()
    options = [
        click.option("--model", "-m", type=click.Path(), default=None,
                     help="A .gguf file or a folder of them [default: LLM_MODEL_PATH, then "
                          "models/llm/, then the embedded model]."),
        click.option("--ctx", "max_length", type=int, default=None,
                     help="Context window in tokens [default: MAX_LENGTH or 4096]."),
        click.option("--max-tokens", type=int, default=None,
                     help=f"Most tokens to generate [default: DEFAULT_MAX_TOKENS or {d.max_tokens}]."),
        click.option("--temperature", "-t", type=float, default=None,
                     help=f"Sampling temperature, 0 = greedy [default: {d.temperature}]."),
        click.option("--top-p", type=float, default=None,
                     help=f"Nucleus sampling mass [default: {d.top_p}]."),
        click.option("--top-k", type=int, default=None,
                     help=f"Sample among the K likeliest tokens, 0 = all [default: {d.top_k}]."),
        click.option("--min-p", type=float, default=None, help="Min-p sampling [default: off]."),
        click.option("--repeat-penalty", type=float, default=None,
                     help="Penalty for repeated tokens, 1 = off [default: 1]."),
        click.option("--seed", type=int, default=None,
                     help="Sampling seed, for reproducible answers [default: random]."),
        click.option("--stop", multiple=True, help="Stop the answer at this text (repeatable)."),
        click.option("--reasoning-effort", type=click.Choice(["low", "medium", "high"]),
                     default=None, help="gpt-oss reasoning level [default: low]."),
        click.option("--system", default=None,
                     help="Instructions for the model (gpt-oss: the developer message)."),
        click.option("--show-reasoning", is_flag=True, help="Print gpt-oss reasoning to stderr."),
        click.option("--stats", is_flag=True,
                     help="After the answer: time to first token, prompt tokens (cached / "
                          "evaluated), generated tokens, tokens/s (stderr)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return verbosity_options(fn)


def flags_from(kw: dict[str, Any]) -> Flags:
    """Pops the generation flags out of a command's keyword arguments."""
    names = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed",
             "stop", "reasoning_effort", "overflow"]
    params = {n: kw.pop(n, None) for n in names}
    if params["stop"]:
        params["stop"] = tuple(params["stop"])
    return Flags(kw.pop("max_length", None), **params)
