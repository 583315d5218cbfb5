"""Prompt formats: harmony for gpt-oss, the model's own chat template, or plain completion.

In every format the text a user supplied (questions, context passages, earlier
turns, instructions) is tokenized as plain text and only the format's own markup
with special-token parsing, so user text cannot forge a message.
"""

from __future__ import annotations

import array
import datetime as _dt
import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import GenerationConfig
from ..errors import InvalidParameterError
from ..harmony import DEFAULT_INSTRUCTIONS, HarmonyTokens, Segment, Turn, render_conversation
from ..harmony.render import INSTRUCTION_ROLES, ROLES, context_end, question_offset
from .chat_template import ChatTemplate
from .native import NativeModel

__all__ = ["PromptKind", "PromptBuilder", "Prompt"]

# A segment's tokens depend on its text alone (each is tokenized on its own), so the system
# and developer messages, the markup and a RAG document are tokenized once and then taken
# from a memo. A RAG user message splits where "Question: " begins, right after a newline:
# the o200k pre-tokenizer (llama.cpp's "gpt-4o") never joins a newline to the letter after
# it (no piece of its regex holds a newline and then a letter), so the context's tokens and
# the question's, put together, are the whole message's (tests/test_harmony_reference.py
# holds this against openai-harmony on the real vocabulary).
_SPLIT_PRE = "gpt-4o"
_MEMO_SEGMENTS = 32  # the segments whose tokens are kept
# and the longest one kept (characters): 32 of them hold at most ~16 MB with their tokens,
# whatever bodies a server is sent; a longer text costs far more to evaluate than to tokenize
_MEMO_CHARS = 1 << 18

# A base model has no turns: frame the question as a document and stop where
# the next question or a blank line would begin.
_COMPLETION_STOPS = ("\nQuestion:", "\n\n")
# A few worked question/answer pairs before the user's: a base model follows the
# pattern (short, factual answers) far better than a bare "Question:". Measured on the
# embedded Gemma 3 270M at the default sampling settings (benchmarks/first_answer.py):
# with the frame Paris 20/20, Tokyo, Shakespeare and Leonardo 10/10 each; without it
# Tokyo and Shakespeare 2/5, Leonardo 3/5. The frame comes first and never changes, so
# it stays in the KV cache across questions, and a RAG context (inside the user's turn)
# still comes right before its question.
_COMPLETION_FRAME = (
    "Question: What is the capital of Germany?\nAnswer: Berlin.\n\n"
    "Question: Who wrote Romeo and Juliet?\nAnswer: William Shakespeare.\n\n"
    "Question: How many legs does a spider have?\nAnswer: Eight.\n\n"
)


class PromptKind(enum.Enum):
    HARMONY = "harmony"
    CHAT_TEMPLATE = "chat-template"
    COMPLETION = "completion"


@dataclass(frozen=True)
class Prompt:
    """Tokens ready for the engine and the text stops that go with them."""

    tokens: list[int]
    stops: tuple[str, ...]
    raw: bool = False  # a text continued as it is (no turns, read as plain text)
    dropped_turns: int = 0  # oldest turns left out to fit the window (drop_oldest_turns)
    calls: bool = False  # the reply may call functions: its messages to functions.NAME are calls
    # the leading tokens that another question over the same context shares (a RAG prompt up
    # to its question; 0: not known): the KV cache keeps a window checkpoint there
    n_shared: int = 0


class PromptBuilder:
    """Builds prompts for one model in the format it was trained on.

    Args:
        model: the loaded model (its vocabulary and metadata).
        architecture: ``general.architecture`` of the file.
        current_date: ``CURRENT_DATE``: ``none`` (gpt-oss's system message carries no date,
            as openai-harmony renders it without one; chat templates get today), ``today``,
            or a fixed ``YYYY-MM-DD``.

    Raises:
        ModelLoadError: the model's chat template does not parse.
    """

    def __init__(self, model: NativeModel, architecture: str, current_date: str = "none") -> None:
        self._model = model
        self._current_date = current_date
        self.harmony: HarmonyTokens | None = None
        self._template: ChatTemplate | None = None
        self._splits = model.meta("tokenizer.ggml.pre") == _SPLIT_PRE
        # thread-safe (several callers build prompts at once); 4-byte arrays, only read
        self._segment_tokens = functools.lru_cache(_MEMO_SEGMENTS)(self._tokens_array)
        if has_tool_calls(architecture):  # harmony: its format carries the calls
            self.harmony = HarmonyTokens.from_lookup(model.special_token_id)
        if self.harmony is not None:
            self.kind = PromptKind.HARMONY
            return
        source = model.meta("tokenizer.chat_template")
        if source:
            self._template = ChatTemplate(source, model.path, self._text_of(model.bos_id),
                                          self._text_of(model.eos_id))
            self.kind = PromptKind.CHAT_TEMPLATE
        else:
            self.kind = PromptKind.COMPLETION

    def _text_of(self, token: int) -> str:
        return self._model.piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def build(self, turns: Sequence[Turn], cfg: GenerationConfig,
              instructions: str | None = None, *, date: _dt.date | None = None,
              question: str | None = None) -> Prompt:
        """Renders and tokenizes a conversation that ends with the user's turn.

        Args:
            turns: the conversation; ``system`` / ``developer`` turns are instructions.
            cfg: the generation parameters (reasoning effort, stop strings).
            instructions: the application's instructions: gpt-oss's developer
                message (the default instructions when None and no instruction
                turn is given), a chat template's system message.
            date: the date shown to the model (None: as ``current_date`` says).
            question: the last turn is a RAG question over a context (:func:`~ggufllm.harmony.
                render.rag_user_message`) and this is its question: the prompt's ``n_shared``
                says where it begins (gpt-oss; other formats leave it 0).

        Raises:
            InvalidParameterError: a turn has an unknown role, or the chat
                template refused the conversation.
            ModelLoadError: the chat template failed or left its sandbox.
        """
        for turn in turns:
            if turn.role not in ROLES:
                raise InvalidParameterError(f"turn role must be one of {', '.join(ROLES)} "
                                            f"(got {turn.role!r})", "turns")
        date = date or self._date()
        if self.kind is not PromptKind.HARMONY:
            _check_no_tools(turns, cfg)
        if self.kind is PromptKind.HARMONY:
            if instructions is None and not any(t.role in INSTRUCTION_ROLES for t in turns):
                instructions = DEFAULT_INSTRUCTIONS
            tools = cfg.tools if cfg.tool_choice != "none" else ()
            segments = render_conversation(turns, reasoning_effort=cfg.reasoning_effort,
                                           instructions=instructions, date=date, tools=tools)
            starts: list[int] = []
            tokens = self._tokenize_segments(segments, starts=starts,
                                             split=self._question_split(segments, question))
            n_shared = self._question_start(segments, starts, tokens, question) if question else 0
            return Prompt(tokens, cfg.stop, calls=bool(tools), n_shared=n_shared)
        if self.kind is PromptKind.CHAT_TEMPLATE:
            return Prompt(self._render_template(turns, instructions, date), cfg.stop)
        return Prompt(self._completion(turns, instructions), _COMPLETION_STOPS + cfg.stop)

    def _date(self) -> _dt.date | None:
        if self._current_date == "none":
            return None
        if self._current_date == "today":
            return _dt.date.today()
        return _dt.date.fromisoformat(self._current_date)

    def raw(self, text: str, cfg: GenerationConfig) -> Prompt:
        """A raw continuation prompt: ``text`` tokenized as plain text (after the BOS the
        model wants), read back as plain text with only the caller's stop strings."""
        m = self._model
        return Prompt(m.tokenize(text, add_special=m.add_bos, parse_special=False), cfg.stop,
                      raw=True)

    def _tokenize_segments(self, segments: Sequence[Segment], add_bos: bool = False, *,
                           starts: list[int] | None = None,
                           split: tuple[int, int] | None = None) -> list[int]:
        """The segments' tokens (each from the memo); ``starts`` (when given) gets each
        segment's first index; ``split`` = (segment, character): that plain segment is
        tokenized as two, the text before the character and the rest (see
        :meth:`_question_split`)."""
        m = self._model
        tokens: list[int] = [m.bos_id] if add_bos and m.bos_id >= 0 else []
        for i, seg in enumerate(segments):
            if starts is not None:
                starts.append(len(tokens))
            if split is not None and split[0] == i:
                tokens += self._tokens(seg.text[:split[1]], False)
                tokens += m.tokenize(seg.text[split[1]:], add_special=False, parse_special=False)
                continue
            tokens += self._tokens(seg.text, seg.special)
        return tokens

    def _tokens(self, text: str, special: bool) -> Sequence[int]:
        if len(text) > _MEMO_CHARS:
            return self._model.tokenize(text, add_special=False, parse_special=special)
        return self._segment_tokens(text, special)

    def _tokens_array(self, text: str, special: bool) -> array.array[int]:
        return array.array("i", self._model.tokenize(text, add_special=False,
                                                     parse_special=special))

    def _question_split(self, segments: Sequence[Segment],
                        question: str | None) -> tuple[int, int] | None:
        """Where a RAG user message's context ends (segment, character): right after the
        newline before ``Question: ``; None when the message has no context, the question is
        not its end, or the vocabulary's pre-tokenizer is not one known to split there."""
        user = len(segments) - 3  # ..., the user's text, <|end|>, <|start|>assistant
        if not question or not self._splits or user < 0 or segments[user].special:
            return None
        end = context_end(segments[user].text, question)
        return None if end is None else (user, end)

    def _question_start(self, segments: Sequence[Segment], starts: Sequence[int],
                        tokens: Sequence[int], question: str) -> int:
        """The index of the first token of ``question`` in ``tokens`` (a harmony prompt whose
        last user message, ``segments[-3]``, ends with it; ``starts[i]``: segment i's first
        token); 0 when it cannot be told. A token that holds the question's start and what
        precedes it counts as the question's."""
        user = len(segments) - 3  # ..., the user's text, <|end|>, <|start|>assistant
        if user < 0 or segments[user].special:
            return 0
        offset = question_offset(segments[user].text, question)
        if offset is None:
            return 0
        # from the end: the question is short, the context before it may be long
        start = len(segments[user].text.encode("utf-8"))  # where token i begins, in bytes
        for i in range(starts[user + 1] - 1, starts[user] - 1, -1):
            start -= len(self._model.piece(tokens[i]))
            if start <= offset:
                return i
        return 0

    def _render_template(self, turns: Sequence[Turn], instructions: str | None,
                         date: _dt.date | None) -> list[int]:
        # Instructions become one system message first, as most templates expect.
        system = [instructions] if instructions else []
        system += [t.content for t in turns if t.role in INSTRUCTION_ROLES]
        messages = [{"role": "system", "content": "\n\n".join(system)}] if system else []
        messages += [{"role": t.role, "content": t.content} for t in turns
                     if t.role not in INSTRUCTION_ROLES]
        assert self._template is not None
        segments = self._template.render(messages, date)
        # The template writes the BOS itself when it wants one.
        bos = self._text_of(self._model.bos_id)
        add_bos = self._model.add_bos and not (bos and segments and segments[0].special
                                                and segments[0].text.startswith(bos))
        safe = self._tokenize_segments(segments, add_bos)
        # Tokenized in one piece the text gives the tokens the model was trained
        # on (merges across span edges, SentencePiece's space prefix only at the
        # start); that is used whenever it holds exactly the markup's control
        # tokens, i.e. no user span turned into one.
        whole = self._tokenize_segments([Segment("".join(s.text for s in segments), True)],
                                        add_bos)
        return whole if self._controls(whole) == self._controls(safe) else safe

    def _controls(self, tokens: Sequence[int]) -> list[int]:
        """The control tokens (those with no text of their own) among ``tokens``, in order."""
        m = self._model
        return [t for t in tokens if not m.piece(t) and m.piece(t, special=True)]

    def _completion(self, turns: Sequence[Turn], instructions: str | None = None) -> list[int]:
        """A question/answer document: instructions, the worked examples, then the turns."""
        parts: list[str] = [f"{instructions.strip()}\n\n"] if instructions else []
        parts.append(_COMPLETION_FRAME)
        for turn in turns:
            content = turn.content.strip()
            if turn.role == "assistant":
                parts.append(f" {content}\n\n")
                continue
            if turn.role in INSTRUCTION_ROLES:
                parts.append(f"{content}\n\n")
                continue
            if "Question:" not in content:
                content = f"Question: {content}"
            parts.append(f"{content}\nAnswer:")
        text = "".join(parts)
        return self._model.tokenize(text, add_special=self._model.add_bos, parse_special=False)


def has_tool_calls(architecture: str) -> bool:
    """Whether a model of ``architecture`` takes tools: one with a call format ggufllm reads
    (gpt-oss's harmony)."""
    return architecture == "gpt-oss"


def no_tool_calls_error() -> InvalidParameterError:
    return InvalidParameterError(
        "this model has no tool-call support: tools, tool calls and tool results (the "
        "\"tool\" role) need a gpt-oss (harmony) model", "tools")


def _check_no_tools(turns: Sequence[Turn], cfg: GenerationConfig) -> None:
    """Tools need a model with a call format ggufllm reads: gpt-oss's harmony. Other models
    are refused rather than shown tools whose calls nobody would parse."""
    if cfg.tools or cfg.tool_choice != "auto" or any(
            t.role == "tool" or t.tool_calls for t in turns):
        raise no_tool_calls_error()
