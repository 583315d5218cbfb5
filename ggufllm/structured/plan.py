"""What the sampler needs for one structured answer: its grammar, and for gpt-oss its guide."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import InvalidParameterError
from ..harmony import HarmonyTokens
from ..harmony.constrain import AnswerGuide, answer_grammar
from ..harmony.tools import answer_or_call_grammar, call_header_text, calls_grammar, trigger_patterns
from . import ResponseFormat
from .schema import max_answer_tokens, schema_to_gbnf
from .tools import ForcedFunction, FunctionTool, ToolChoice

__all__ = ["GrammarSpec", "AnswerPlan", "plan_reply", "plan_answer", "plan_calls",
           "plan_answer_or_call"]


@dataclass(frozen=True)
class GrammarSpec:
    """A GBNF grammar for llama.cpp's grammar sampler.

    Attributes:
        gbnf: the grammar text.
        root: its start symbol.
        trigger_patterns: a lazy grammar waits until one of these regular expressions matches
            the text written so far (it is fed from the pattern's first group on).
        trigger_tokens: ... or until one of these tokens is written (fed from that token on).
    """

    gbnf: str
    root: str = "root"
    trigger_patterns: tuple[str, ...] = ()
    trigger_tokens: tuple[int, ...] = ()

    @property
    def lazy(self) -> bool:
        return bool(self.trigger_patterns or self.trigger_tokens)


@dataclass
class AnswerPlan:
    """The grammar of a reply, the guide that bounds gpt-oss's reasoning (None for other
    models: their grammar applies from the first token), and the tokens banned inside the
    answer (control tokens, whose text the grammar would take for answer text) — inside a
    call's arguments, ``banned_in_call`` when a reply may be either."""

    grammar: GrammarSpec
    guide: AnswerGuide | None
    banned_in_answer: tuple[int, ...]
    banned_in_call: tuple[int, ...] | None = None


def plan_reply(fmt: ResponseFormat | None, tools: Sequence[FunctionTool], choice: ToolChoice,
               *, max_tokens: int, reasoning_budget: int | None, harmony: HarmonyTokens | None,
               tokenize: Callable[[str], list[int]], piece: Callable[[int], bytes],
               controls: Callable[[], tuple[int, ...]],
               eogs: Callable[[], tuple[int, ...]]) -> AnswerPlan | None:
    """The plan of one request's reply: a structured answer (``fmt``), a call to one of
    ``tools``, either (``auto`` with both), or None when nothing constrains it.

    A forced call (``required``, a named function) leaves no room for an answer, so ``fmt``
    then changes nothing; ``none`` leaves the answer alone. Arguments as for
    :func:`plan_answer`; ``eogs`` gives the tokens that end generation.

    Raises:
        InvalidParameterError: tools for a model that is not gpt-oss.
    """
    calls = bool(tools) and choice != "none"
    if calls and harmony is None:  # the prompt builder refuses tools for such a model first
        raise InvalidParameterError("this model has no tool-call support", "tools")
    common = dict(max_tokens=max_tokens, reasoning_budget=reasoning_budget, tokenize=tokenize,
                  piece=piece)
    if fmt is not None and not calls:
        return plan_answer(fmt, harmony=harmony, controls=controls, **common)
    if not calls:
        return None
    assert harmony is not None
    call_controls = lambda: controls() + eogs()  # noqa: E731
    if fmt is None or choice != "auto":
        return plan_calls(tools, choice, harmony=harmony, controls=call_controls, **common)
    return plan_answer_or_call(fmt, tools, harmony=harmony, controls=call_controls,
                               **common)


def plan_answer(fmt: ResponseFormat, *, max_tokens: int, reasoning_budget: int | None,
                harmony: HarmonyTokens | None, tokenize: Callable[[str], list[int]],
                piece: Callable[[int], bytes], controls: Callable[[], tuple[int, ...]]
                ) -> AnswerPlan:
    """Builds the plan of one request.

    Args:
        fmt: the format asked for.
        max_tokens: the request's budget.
        reasoning_budget: the most analysis tokens (gpt-oss only).
        harmony: the control tokens of a gpt-oss vocabulary, None for other models.
        tokenize: text -> token ids, special tokens parsed.
        piece: token id -> its text.
        controls: the vocabulary's control tokens that do not end generation.
    """
    json_gbnf = schema_to_gbnf(fmt.json_schema)
    banned = controls()
    if harmony is None:
        return AnswerPlan(GrammarSpec(json_gbnf), None, banned)
    gbnf, root = answer_grammar(json_gbnf, harmony)
    guide = AnswerGuide(harmony, tokenize, piece, max_tokens=max_tokens,
                        answer_tokens=max_answer_tokens(fmt.json_schema),
                        reasoning_budget=reasoning_budget)
    t = harmony
    # <|call|> ends generation too: inside an answer it would end it as a tool call
    harmony_ids = (t.start, t.end, t.message, t.channel, t.constrain, t.call)
    return AnswerPlan(GrammarSpec(gbnf, root), guide, tuple(sorted(set(banned + harmony_ids))))


def plan_calls(tools: Sequence[FunctionTool], choice: ToolChoice, *, max_tokens: int,
               reasoning_budget: int | None, harmony: HarmonyTokens,
               tokenize: Callable[[str], list[int]], piece: Callable[[int], bytes],
               controls: Callable[[], tuple[int, ...]]) -> AnswerPlan | None:
    """The plan of a gpt-oss reply that may (``auto``) or must (``required``, a named
    function) call one of ``tools``; None when it calls none (``none``, no tools).

    ``auto`` is a lazy grammar: the model writes freely until it addresses ``functions.``,
    and from there the call follows the grammar. A forced call is the whole reply's grammar
    (free analysis, then the call) with a guide that writes the call's header when the
    reasoning has used its budget. Either way the arguments cannot hold a control token,
    and only ``<|call|>`` ends them.
    """
    if choice == "none" or not tools:
        return None
    if isinstance(choice, ForcedFunction):
        tools = [t for t in tools if t.name == choice.name]
    forced = choice != "auto"
    gbnf, root = calls_grammar(tools, harmony, forced=forced)
    bounds = [max_answer_tokens(t.checked_parameters(i)) for i, t in enumerate(tools)]
    answer_tokens = None if None in bounds else (
        max(b for b in bounds if b is not None) + max(len(t.name) for t in tools))
    guide = AnswerGuide(harmony, tokenize, piece, max_tokens=max_tokens,
                        answer_tokens=answer_tokens, reasoning_budget=reasoning_budget,
                        header=call_header_text(tools[0].name if len(tools) == 1 else None),
                        call=True, force=forced)
    spec = GrammarSpec(gbnf, root) if forced else GrammarSpec(gbnf, root, trigger_patterns())
    t = harmony
    # inside the arguments: no control token, and only <|call|> ends them (``controls`` gives
    # the tokens that end generation too)
    harmony_ids = (t.start, t.end, t.message, t.channel, t.constrain, t.return_)
    banned = set(controls() + harmony_ids) - {t.call}
    return AnswerPlan(spec, guide, tuple(sorted(banned)))


def plan_answer_or_call(fmt: ResponseFormat, tools: Sequence[FunctionTool], *, max_tokens: int,
                        reasoning_budget: int | None, harmony: HarmonyTokens,
                        tokenize: Callable[[str], list[int]], piece: Callable[[int], bytes],
                        controls: Callable[[], tuple[int, ...]]) -> AnswerPlan:
    """The plan of a gpt-oss reply that answers with ``fmt`` or calls one of ``tools``
    (``tool_choice="auto"``): free analysis, then the final JSON answer or a call, both
    following their schemas. When the reasoning has used its budget the guide forces the
    answer's header (an answer always fits what is kept for it; a call may still come first).
    ``controls`` gives the control tokens and those that end generation.
    """
    gbnf, root = answer_or_call_grammar(schema_to_gbnf(fmt.json_schema), tools, harmony)
    bounds = [max_answer_tokens(fmt.json_schema)] + [
        None if (b := max_answer_tokens(t.checked_parameters(i))) is None else b + len(t.name)
        for i, t in enumerate(tools)]
    answer_tokens = None if None in bounds else max(b for b in bounds if b is not None)
    guide = AnswerGuide(harmony, tokenize, piece, max_tokens=max_tokens,
                        answer_tokens=answer_tokens, reasoning_budget=reasoning_budget,
                        call=True, final=True)
    t = harmony
    every = set(controls()) | {t.start, t.end, t.message, t.channel, t.constrain, t.return_,
                               t.call}
    # a final answer ends with <|return|>, a call's arguments with <|call|>
    return AnswerPlan(GrammarSpec(gbnf, root), guide, tuple(sorted(every - {t.return_})),
                      tuple(sorted(every - {t.call})))
