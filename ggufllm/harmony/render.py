"""Harmony prompts for gpt-oss.

A prompt is a list of :class:`Segment` values: the harmony markers are
tokenized as special tokens, everything the user wrote as plain text, so a
question or a RAG passage that contains ``<|end|>`` cannot forge a message.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..chunks import ToolCall
from ..config import ReasoningEffort
from ..structured.tools import FunctionTool
from .tools import CALL_CHANNEL_LINE, FUNCTIONS, tools_section

__all__ = ["Segment", "Turn", "render_conversation", "rag_user_message", "question_offset",
           "context_end", "DEFAULT_INSTRUCTIONS", "KNOWLEDGE_CUTOFF", "ROLES", "INSTRUCTION_ROLES"]

# The system message gpt-oss was trained with (harmony specification; openai-harmony's
# SystemContent renders the same text); only the date and the reasoning level vary. As in
# openai-harmony, the date line is there only when a date is given (CURRENT_DATE).
KNOWLEDGE_CUTOFF = "2024-06"
_SYSTEM = (
    "You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: {cutoff}\n"
    "{date_line}\n"
    "Reasoning: {effort}\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
)
# Turn roles: instructions from the application, or the conversation itself.
INSTRUCTION_ROLES = ("system", "developer")
ROLES = ("user", "assistant", "tool") + INSTRUCTION_ROLES

DEFAULT_INSTRUCTIONS = (
    "Answer the user's question. When context passages are given, base the answer on them "
    "and say so when they do not contain the answer. Answer in the language of the question."
)


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of prompt text; ``special`` pieces are parsed for special tokens."""

    text: str
    special: bool = False


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of a conversation.

    ``role`` is ``user`` or ``assistant``, or ``system`` / ``developer`` for
    instructions (gpt-oss gets them in its developer message; chat-template
    models in their system message), or ``tool`` for a function's result.

    Attributes:
        role: who speaks.
        content: the text (for a tool: the function's result).
        reasoning: an assistant turn's reasoning (gpt-oss's analysis), passed back between
            calls as harmony requires; dropped from the prompt once a final answer follows.
        tool_calls: the functions an assistant turn called.
        name: a tool turn's function name.
    """

    role: str
    content: str
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    name: str | None = None


def rag_user_message(question: str, context: str | None) -> str:
    """The user turn for a RAG question: the passages first, then the question."""
    if not context:
        return question
    return f"Context:\n{context}\n\nQuestion: {question}"


def question_offset(user_text: str, question: str) -> int | None:
    """Where ``question`` begins, in bytes, in ``user_text``: a rendered RAG user message
    (:func:`rag_user_message`, markers broken as :func:`render_conversation` breaks them),
    the space before it included (a tokenizer may join it to the question's first word, or
    not: "Question: 12" is ``:``, `` ``, ``12`` where "Question: Who" is ``:``, `` Who``);
    None when it does not end with it."""
    tail = _defuse(question).encode("utf-8")
    text = user_text.encode("utf-8")
    if not text.endswith(tail):
        return None
    start = len(text) - len(tail)
    return start - 1 if text[:start].endswith(b" ") else start


def context_end(user_text: str, question: str) -> int | None:
    """Where the context of a rendered RAG user message (:func:`rag_user_message`) ends, in
    characters: right after the newline before ``Question: ``; None when ``user_text`` is
    not such a message ending with ``question``."""
    tail = "Question: " + _defuse(question)
    if len(user_text) <= len(tail) or not user_text.endswith(tail) \
            or user_text[-len(tail) - 1] != "\n":
        return None
    return len(user_text) - len(tail)


# llama.cpp marks some harmony tokens USER_DEFINED, and those are matched even
# in text tokenized without special parsing: break the marker in user text.
_MARKER = re.compile(r"<\|([a-z_0-9]+)\|>")


def _defuse(text: str) -> str:
    return _MARKER.sub("<\u200b|\\1|>", text)


def _message(role: str, content: str, channel: str | None = None) -> list[Segment]:
    content = _defuse(content)
    header = f"<|start|>{role}" + (f"<|channel|>{channel}" if channel else "") + "<|message|>"
    return [Segment(header, special=True), Segment(content), Segment("<|end|>", special=True)]


def _call(call: ToolCall) -> list[Segment]:
    """An assistant message that calls a function, as openai-harmony renders one (the
    recipient in the role part, ``<|call|>`` at the end)."""
    return [Segment("<|start|>assistant", special=True),
            Segment(_defuse(f" to={FUNCTIONS}.{call.name}")),
            Segment("<|channel|>commentary", special=True), Segment(" "),
            Segment("<|constrain|>json<|message|>", special=True), Segment(_defuse(call.arguments)),
            Segment("<|call|>", special=True)]


def _result(turn: Turn) -> list[Segment]:
    """A tool message: the function's result, addressed to the assistant."""
    return [Segment("<|start|>", special=True),
            Segment(_defuse(f"{FUNCTIONS}.{turn.name or ''}")),
            Segment(" to=assistant<|channel|>commentary<|message|>", special=True),
            Segment(_defuse(turn.content)), Segment("<|end|>", special=True)]


def _messages(turns: Sequence[Turn]) -> list[tuple[str | None, list[Segment]]]:
    """The conversation's messages after the developer message, each with its channel."""
    out: list[tuple[str | None, list[Segment]]] = []
    for turn in turns:
        if turn.role == "assistant":
            if turn.reasoning:
                out.append(("analysis", _message("assistant", turn.reasoning, "analysis")))
            if not turn.tool_calls:
                out.append(("final", _message("assistant", turn.content, channel="final")))
                continue
            if turn.content:  # a preamble to the calls, shown to the user
                out.append(("commentary", _message("assistant", turn.content, "commentary")))
            out += [("commentary", _call(call)) for call in turn.tool_calls]
        elif turn.role == "tool":
            out.append(("commentary", _result(turn)))
        elif turn.role not in INSTRUCTION_ROLES:
            out.append((None, _message("user", turn.content)))
    # openai-harmony's render_conversation_for_completion (auto_drop_analysis): when the
    # last assistant message is a final answer, the analysis before the first final answer
    # is dropped; while calls are under way it all stays (the reasoning between calls)
    assistant = [c for c, m in out if m[0].text.startswith("<|start|>assistant")]
    if assistant and assistant[-1] == "final":
        first = next(i for i, (c, _) in enumerate(out) if c == "final")
        out = [(c, m) for i, (c, m) in enumerate(out) if not (i < first and c == "analysis")]
    return out


def render_conversation(
    turns: Sequence[Turn],
    *,
    reasoning_effort: ReasoningEffort = "low",
    instructions: str | None = DEFAULT_INSTRUCTIONS,
    date: _dt.date | None = None,
    tools: Sequence[FunctionTool] = (),
) -> list[Segment]:
    """Renders a conversation that ends with a user turn (or a tool's result), ready for the
    assistant's reply.

    Earlier assistant turns carry their final answer, their calls, and the reasoning they
    were given back (harmony keeps it while calls are under way and drops it once a final
    answer follows). ``system`` and ``developer`` turns are instructions: they join
    ``instructions`` in the one developer message, in order (the harmony system message is
    the model's own and stays as trained).

    Args:
        turns: the conversation so far; the last one is the user's or a tool's.
        reasoning_effort: ``low``, ``medium`` or ``high``.
        instructions: the developer instructions; None (with no system or
            developer turn) leaves the developer message out.
        date: the current date shown to the model; None leaves the date line out (as
            openai-harmony does without one), so that a cached prompt prefix stays valid
            from one day to the next.
        tools: functions the model may call: the developer message's ``# Tools`` section.

    Returns:
        The prompt segments, ending with ``<|start|>assistant``.
    """
    date_line = f"Current date: {date.isoformat()}\n" if date else ""
    system = _SYSTEM.format(cutoff=KNOWLEDGE_CUTOFF, date_line=date_line, effort=reasoning_effort)
    if tools:
        system += "\n" + CALL_CHANNEL_LINE
    segments = _message("system", system)
    parts = [instructions] if instructions else []
    parts += [t.content for t in turns if t.role in INSTRUCTION_ROLES]
    sections = ["# Instructions\n\n" + "\n\n".join(parts)] if parts else []
    if tools:
        sections.append(tools_section(tools))
    if sections:
        segments += _message("developer", "\n\n".join(sections))
    for _, message in _messages(turns):
        segments += message
    segments.append(Segment("<|start|>assistant", special=True))
    return segments
