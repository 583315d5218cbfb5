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

from ..config import ReasoningEffort

__all__ = ["Segment", "Turn", "render_conversation", "rag_user_message", "DEFAULT_INSTRUCTIONS",
           "KNOWLEDGE_CUTOFF", "ROLES", "INSTRUCTION_ROLES"]

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
ROLES = ("user", "assistant") + INSTRUCTION_ROLES

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
    models in their system message).
    """

    role: str
    content: str


def rag_user_message(question: str, context: str | None) -> str:
    """The user turn for a RAG question: the passages first, then the question."""
    if not context:
        return question
    return f"Context:\n{context}\n\nQuestion: {question}"


# llama.cpp marks some harmony tokens USER_DEFINED, and those are matched even
# in text tokenized without special parsing: break the marker in user text.
_MARKER = re.compile(r"<\|([a-z_0-9]+)\|>")


def _defuse(text: str) -> str:
    return _MARKER.sub("<\u200b|\\1|>", text)


def _message(role: str, content: str, channel: str | None = None) -> list[Segment]:
    content = _defuse(content)
    header = f"<|start|>{role}" + (f"<|channel|>{channel}" if channel else "") + "<|message|>"
    return [Segment(header, special=True), Segment(content), Segment("<|end|>", special=True)]


def render_conversation(
    turns: Sequence[Turn],
    *,
    reasoning_effort: ReasoningEffort = "low",
    instructions: str | None = DEFAULT_INSTRUCTIONS,
    date: _dt.date | None = None,
) -> list[Segment]:
    """Renders a conversation that ends with a user turn, ready for the assistant's reply.

    Earlier assistant turns carry only their final answer (harmony drops past
    reasoning from the prompt). ``system`` and ``developer`` turns are
    instructions: they join ``instructions`` in the one developer message, in
    order (the harmony system message is the model's own and stays as trained).

    Args:
        turns: the conversation so far; the last one is the user's.
        reasoning_effort: ``low``, ``medium`` or ``high``.
        instructions: the developer instructions; None (with no system or
            developer turn) leaves the developer message out.
        date: the current date shown to the model; None leaves the date line out (as
            openai-harmony does without one), so that a cached prompt prefix stays valid
            from one day to the next.

    Returns:
        The prompt segments, ending with ``<|start|>assistant``.
    """
    date_line = f"Current date: {date.isoformat()}\n" if date else ""
    segments = _message("system", _SYSTEM.format(cutoff=KNOWLEDGE_CUTOFF, date_line=date_line,
                                                 effort=reasoning_effort))
    parts = [instructions] if instructions else []
    parts += [t.content for t in turns if t.role in INSTRUCTION_ROLES]
    if parts:
        segments += _message("developer", "# Instructions\n\n" + "\n\n".join(parts))
    for turn in turns:
        if turn.role == "assistant":
            segments += _message("assistant", turn.content, channel="final")
        elif turn.role not in INSTRUCTION_ROLES:
            segments += _message("user", turn.content)
    segments.append(Segment("<|start|>assistant", special=True))
    return segments
