"""The budget rule, and making a prompt fit the window: the ``overflow`` policies of
:class:`GenerationConfig`.

The rule (:func:`check_budget`, the one place it is written; the engine checks every
request with it, the CLI checks a typed ``--max-tokens`` with it before loading): a
request of ``n_prompt`` tokens asking for ``max_tokens`` more fits a window of ``n_ctx``
when the prompt is not empty, ``max_tokens <= n_ctx`` and ``n_prompt + max_tokens <=
n_ctx``; it then holds at most :func:`cells_needed` KV cells, which the stepper reserves
for it in the pool.

- ``error`` (default): :class:`ContextLengthExceededError` with the counts;
- ``truncate_context``: cut the end of the RAG context (never the question or the
  instructions), with a warning naming how many tokens were dropped;
- ``shrink_max_tokens``: lower ``max_tokens`` to what fits;
- ``drop_oldest_turns``: drop the oldest user/assistant turns of a chat (system
  and developer turns and the last user turn stay).

Before anything is tokenized, a text that cannot fit whatever the policy (the last turn,
the RAG question, the raw prompt) is refused from its length alone: no token stands for
more than ``Engine.max_token_bytes`` bytes, so a text of B bytes takes at least
``ceil(B / max_token_bytes)`` tokens (:func:`refuse_what_cannot_fit`). Where the
vocabulary cannot tell (WordPiece, Unigram), such a text is tokenized and refused after.

Every policy raises :class:`ContextLengthExceededError` when it cannot make the
prompt fit (no context to cut, a last turn alone too long...).

A *default* budget (``DEFAULT_MAX_TOKENS``, when the caller gave no ``max_tokens``) never
makes a call fail: where the policy cannot make room for it, it is capped to what the
window leaves after the prompt. Only a budget the caller asked for is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..config import GenerationConfig
from ..errors import ContextLengthExceededError, InvalidParameterError
from ..harmony import Turn, rag_user_message
from .prompt import Prompt

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["RagQuestion", "check_budget", "cells_needed", "fit_prompt", "fit_raw",
           "refuse_what_cannot_fit"]

logger = logging.getLogger(__name__)
_MAX_TRIES = 8


def check_budget(n_prompt: int, max_tokens: int, n_ctx: int) -> None:
    """The budget rule: raises unless ``n_prompt`` tokens and ``max_tokens`` more fit ``n_ctx``.

    Raises:
        InvalidParameterError: ``max_tokens`` alone exceeds the window, or an empty prompt.
        ContextLengthExceededError: ``n_prompt + max_tokens > n_ctx``.
    """
    if max_tokens > n_ctx:
        raise InvalidParameterError(
            f"max_tokens={max_tokens} exceeds the context window of {n_ctx}", "max_tokens")
    if n_prompt == 0:
        raise InvalidParameterError("the prompt is empty", "question")
    if n_prompt + max_tokens > n_ctx:
        raise ContextLengthExceededError(n_prompt, n_ctx, max_tokens)


def cells_needed(n_prompt: int, max_tokens: int, n_ctx: int) -> int:
    """The most KV cells a request that passed :func:`check_budget` can hold."""
    return min(n_prompt + max_tokens, n_ctx)


@dataclass(frozen=True)
class RagQuestion:
    """The last user turn of a RAG call, kept apart so that its context can be cut."""

    question: str
    context: str | None

    def turn(self, context: str | None) -> Turn:
        return Turn("user", rag_user_message(self.question, context))


def fit_prompt(engine: Engine, turns: Sequence[Turn], cfg: GenerationConfig,
               instructions: str | None, rag: RagQuestion | None = None, *,
               budget_given: bool = True) -> tuple[Prompt, GenerationConfig]:
    """Builds the prompt of ``turns`` (+ ``rag`` as the last turn) and applies ``cfg.overflow``.

    Args:
        budget_given: whether the caller asked for ``cfg.max_tokens``; False for the default
            budget, which is capped to the window rather than refused.

    Returns:
        The prompt and the config to generate with (``max_tokens`` may be lowered).

    Raises:
        ContextLengthExceededError: it does not fit and the policy cannot help.
        InvalidParameterError: the budget alone exceeds the window, or an empty prompt.
    """
    n_ctx = engine.n_ctx
    if budget_given and cfg.max_tokens > n_ctx and cfg.overflow != "shrink_max_tokens":
        check_budget(1, cfg.max_tokens, n_ctx)  # raises: no prompt leaves room for it
    refuse_what_cannot_fit(engine, _kept_by_every_policy(turns, rag, cfg), cfg)
    all_turns = list(turns) + ([rag.turn(rag.context)] if rag is not None else [])
    prompt = engine.build(all_turns, cfg, instructions, question=rag.question if rag else None)
    if len(prompt.tokens) + cfg.max_tokens <= n_ctx or not prompt.tokens:
        return prompt, cfg
    try:
        return _apply_policy(engine, list(turns), all_turns, cfg, instructions, rag, prompt)
    except ContextLengthExceededError:
        if budget_given or len(prompt.tokens) >= n_ctx:
            raise
    return prompt, _capped(len(prompt.tokens), n_ctx, cfg)


def fit_raw(engine: Engine, text: str, cfg: GenerationConfig, *,
            budget_given: bool = True) -> tuple[Prompt, GenerationConfig]:
    """The raw continuation prompt of ``text``, with a default budget capped to the window
    (an asked-for one is checked by :meth:`Engine.check_budget`, as is the rest)."""
    refuse_what_cannot_fit(engine, [text], cfg)
    prompt = engine.raw(text, cfg)
    n_prompt, n_ctx = len(prompt.tokens), engine.n_ctx
    if budget_given or not 0 < n_prompt < n_ctx or n_prompt + cfg.max_tokens <= n_ctx:
        return prompt, cfg
    return prompt, _capped(n_prompt, n_ctx, cfg)


def refuse_what_cannot_fit(engine: Engine, texts: Sequence[str], cfg: GenerationConfig) -> None:
    """Refuses, without tokenizing them, texts that alone would fill the window.

    A text of B bytes takes at least ``ceil(B / engine.max_token_bytes)`` tokens (its
    whitespace-stripped length, since prompt formats may strip it). A prompt of ``n_ctx``
    tokens or more fails under every policy, so such texts are refused at once: a body of
    megabytes costs microseconds instead of seconds of tokenization. Nothing is refused
    where the vocabulary cannot bound a token's length (``max_token_bytes`` is None).

    Raises:
        ContextLengthExceededError: with ``n_prompt`` the lower bound on the prompt's tokens.
    """
    n_ctx = engine.n_ctx
    # "replace": a lone surrogate counts one byte here; tokenizing it is refused elsewhere
    n_bytes = sum(len(t.strip().encode("utf-8", "replace")) for t in texts)
    if n_bytes < n_ctx:  # at least one byte a token: not even the bound can reach the window
        return
    longest = engine.max_token_bytes
    if longest is None:
        return
    at_least = -(-n_bytes // longest)
    if at_least >= n_ctx:
        raise ContextLengthExceededError(at_least, n_ctx, cfg.max_tokens)


def _kept_by_every_policy(turns: Sequence[Turn], rag: RagQuestion | None,
                          cfg: GenerationConfig) -> list[str]:
    """The texts no overflow policy removes: the RAG question (and its context, unless
    ``truncate_context`` may cut it), else the last turn."""
    if rag is not None:
        keep_context = rag.context and cfg.overflow != "truncate_context"
        return [rag.question] + ([rag.context] if keep_context and rag.context else [])
    return [turns[-1].content] if turns and isinstance(turns[-1].content, str) else []


def _capped(n_prompt: int, n_ctx: int, cfg: GenerationConfig) -> GenerationConfig:
    # the default budget's meaning: up to DEFAULT_MAX_TOKENS, and never past the window
    logger.debug("the default budget of %d tokens is capped to the %d the window leaves",
                 cfg.max_tokens, n_ctx - n_prompt)
    return cfg.updated(max_tokens=n_ctx - n_prompt)


def _apply_policy(engine: Engine, turns: list[Turn], all_turns: list[Turn],
                  cfg: GenerationConfig, instructions: str | None, rag: RagQuestion | None,
                  prompt: Prompt) -> tuple[Prompt, GenerationConfig]:
    """``cfg.overflow`` applied to a prompt that does not fit with its budget."""
    n_ctx = engine.n_ctx
    policy = cfg.overflow
    if policy == "shrink_max_tokens" and len(prompt.tokens) < n_ctx:
        fitted = cfg.updated(max_tokens=n_ctx - len(prompt.tokens))
        logger.warning("the prompt (%d tokens) leaves room for %d of the %d tokens asked",
                       len(prompt.tokens), fitted.max_tokens, cfg.max_tokens)
        return prompt, fitted
    if policy == "truncate_context" and rag is not None and rag.context:
        return _truncate_context(engine, turns, cfg, instructions, rag, prompt), cfg
    if policy == "drop_oldest_turns":
        return _drop_oldest_turns(engine, all_turns, cfg, instructions, prompt), cfg
    raise ContextLengthExceededError(len(prompt.tokens), n_ctx, cfg.max_tokens)


def _truncate_context(engine: Engine, turns: list[Turn], cfg: GenerationConfig,
                      instructions: str | None, rag: RagQuestion, prompt: Prompt) -> Prompt:
    assert rag.context is not None
    ctx_tokens = engine.tokenize(rag.context)
    keep = len(ctx_tokens)
    first = len(prompt.tokens)
    for _ in range(_MAX_TRIES):
        excess = len(prompt.tokens) + cfg.max_tokens - engine.n_ctx
        if excess <= 0:
            logger.warning("the RAG context was cut to fit the window: %d of its %d tokens "
                           "dropped (prompt %d -> %d tokens)", len(ctx_tokens) - keep,
                           len(ctx_tokens), first, len(prompt.tokens))
            return prompt
        keep -= excess
        if keep <= 0:
            break
        # cut the end: retrieved passages usually come best first
        trimmed = engine.detokenize(ctx_tokens[:keep]).rstrip()
        prompt = engine.build(turns + [rag.turn(trimmed or None)], cfg, instructions,
                              question=rag.question)
    raise ContextLengthExceededError(first, engine.n_ctx, cfg.max_tokens)


def _drop_oldest_turns(engine: Engine, turns: list[Turn], cfg: GenerationConfig,
                       instructions: str | None, prompt: Prompt) -> Prompt:
    first = len(prompt.tokens)
    kept = list(turns)
    dropped = 0
    while len(prompt.tokens) + cfg.max_tokens > engine.n_ctx:
        # the oldest user/assistant turn that is not the last one
        index = next((i for i, t in enumerate(kept[:-1])
                      if t.role not in ("system", "developer")), None)
        if index is None:
            raise ContextLengthExceededError(first, engine.n_ctx, cfg.max_tokens)
        del kept[index]
        dropped += 1
        prompt = engine.build(kept, cfg, instructions)
    logger.warning("dropped the %d oldest turn(s) of the conversation to fit the window "
                   "(prompt %d -> %d tokens)", dropped, first, len(prompt.tokens))
    return replace(prompt, dropped_turns=dropped)
