"""Constrained answers in harmony: free reasoning, then a final message that follows a grammar.

The grammar of the whole reply (:func:`answer_grammar`) lets the model write analysis
messages, then requires the final channel, ``<|channel|>final [<|constrain|>json]<|message|>``,
and the answer's own grammar after it. Harmony's control tokens are matched by id
(``<[200005]>``, llama.cpp's token syntax), never by their text, and analysis text holds no
``<``: no token that spells a control token can pass for one, in either direction.

:class:`AnswerGuide` follows the reply token by token and forces the final channel's header
when the reasoning has used its budget, or when what is left of ``max_tokens`` is what the
answer needs: a model that would reason forever (a random-weight one does) still answers.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence

from .parser import HarmonyTokens

__all__ = ["answer_grammar", "final_rule", "AnswerGuide", "HEADER_TEXT", "response_format_section"]

# what the guide forces, in order, from wherever the reply is (the header harmony renders
# for a JSON answer, as openai-harmony writes tool calls: a space, then <|constrain|>json)
HEADER_TEXT = ("<|end|>", "<|start|>", "assistant", "<|channel|>", "final", " ",
               "<|constrain|>", "json", "<|message|>")
# tokens the guide may still let the model write once forcing is due (a role or channel name
# it has begun), and the header itself: kept in reserve beside the answer's own bound
_SLACK = 32


def response_format_section(name: str, schema_text: str, description: str | None) -> str:
    """The ``# Response Formats`` section of the developer message, as harmony lays it out."""
    comment = f"// {description.strip()}\n" if description and description.strip() else ""
    return f"# Response Formats\n\n## {name}\n\n{comment}{schema_text}"


def final_rule(tokens: HarmonyTokens, root: str) -> str:
    """The body of a rule for the final message whose text follows the rule ``root``:
    ``<|channel|>final [<|constrain|>json]<|message|>`` then the answer."""
    t = tokens
    return f'<[{t.channel}]> "final" (" "? <[{t.constrain}]> "json")? <[{t.message}]> {root}'


def answer_grammar(json_gbnf: str, tokens: HarmonyTokens) -> tuple[str, str]:
    """The grammar of a whole harmony reply whose final message follows ``json_gbnf``.

    Args:
        json_gbnf: the answer's grammar, start symbol ``root``.
        tokens: the harmony control token ids.

    Returns:
        The grammar and its start symbol.
    """
    prefix = "harmony"
    while any(line.startswith(prefix + "-") for line in json_gbnf.splitlines()):
        prefix += "x"
    t = tokens
    rules = {
        "reply": f"{prefix}-analysis* {prefix}-final",
        "analysis": f'<[{t.channel}]> "analysis" <[{t.message}]> {prefix}-text* '
                    f'<[{t.end}]> <[{t.start}]> "assistant"',
        "text": "[^<]",
        "final": final_rule(tokens, "root"),
    }
    extra = "\n".join(f"{prefix}-{name} ::= {body}" for name, body in rules.items())
    return f"{json_gbnf}\n{extra}\n", f"{prefix}-reply"


class Phase(enum.Enum):
    START = 1        # before the first header (the prompt ends with <|start|>assistant)
    ROLE = 2         # after <|start|>: the role word
    HEADER = 3       # after <|channel|>: the channel name
    REASONING = 4    # inside an analysis message
    BETWEEN = 5      # after <|end|>
    ANSWER = 6       # inside the final message


class AnswerGuide:
    """Where a constrained harmony reply is, and which token to force next.

    Args:
        tokens: the harmony control token ids.
        tokenize: text -> token ids (special tokens parsed).
        piece: token id -> its text, for the channel name.
        max_tokens: the request's budget.
        answer_tokens: the most tokens the answer can take (None: unknown, half the budget
            is kept for it).
        reasoning_budget: the most analysis tokens (None: only the budget rule).
        header: what forcing writes (:data:`HEADER_TEXT`, or a call's header).
        call: a function call's arguments are an answer (a message whose header addresses
            ``functions.``).
        final: the final channel's message is an answer (the default unless ``call``; both
            when a reply may either answer or call).
        force: False only follows the reply (where the answer is), never forcing a token.
    """

    def __init__(self, tokens: HarmonyTokens, tokenize: Callable[[str], list[int]],
                 piece: Callable[[int], bytes], *, max_tokens: int, answer_tokens: int | None,
                 reasoning_budget: int | None = None, header: Sequence[str] = HEADER_TEXT,
                 call: bool = False, final: bool | None = None, force: bool = True) -> None:
        self._t = tokens
        self._piece = piece
        self._header = [tokenize(text) for text in header]
        self._call = call
        self._final = not call if final is None else final
        self.in_call = False  # inside an answer that is a call's arguments
        self._force = force
        self._head = bytearray()  # the whole header being written (role and channel parts)
        answer = answer_tokens if answer_tokens is not None else max(64, max_tokens // 2)
        self.reserve = answer + _SLACK
        self._max_tokens = max_tokens
        self._budget = reasoning_budget
        self.phase = Phase.START
        self._name = bytearray()  # the channel name (or role) written so far
        self._n = 0               # tokens seen
        self._n_reasoning = 0
        self._queue: deque[int] = deque()

    @property
    def in_answer(self) -> bool:
        return self.phase is Phase.ANSWER

    def _due(self) -> bool:
        if self.phase is Phase.ANSWER or not self._force:
            return False
        if self._budget is not None and self._n_reasoning >= self._budget:
            return True
        return self._max_tokens - self._n <= self.reserve

    def forced(self) -> int | None:
        """The token to write next instead of sampling, or None."""
        if not self._queue and self._due():
            self._queue.extend(self._plan())
        return self._queue[0] if self._queue else None

    def drop_forcing(self) -> None:
        """The grammar refused a forced token: sample instead (and plan again later)."""
        self._queue.clear()

    def _plan(self) -> Sequence[int]:
        """The header tokens still to write from here (none while a name is half written)."""
        parts = {Phase.REASONING: 0, Phase.BETWEEN: 1, Phase.START: 3}
        if self.phase is Phase.ROLE and not self._name:
            start = 2
        elif self.phase is Phase.HEADER and not self._name:
            start = 4
        else:
            start = parts.get(self.phase, -1)
        if start < 0:
            return []
        return [tok for part in self._header[start:] for tok in part]

    def observe(self, token: int) -> None:
        """Follows one written token (sampled or forced)."""
        self._n += 1
        if self._queue and self._queue[0] == token:
            self._queue.popleft()
        elif self._queue:
            self._queue.clear()
        t = self._t
        if token == t.channel:
            self.phase, self._name = Phase.HEADER, bytearray()
        elif token == t.message:
            self.in_call = self._call and b"to=functions." in self._head
            final = self._final and self.phase is Phase.HEADER \
                and self._name.lstrip().startswith(b"final")
            self.phase = Phase.ANSWER if self.in_call or final else Phase.REASONING
            self._head.clear()
        elif token == t.end:
            self.phase = Phase.BETWEEN
            self._head.clear()
        elif token == t.start:
            self.phase, self._name = Phase.ROLE, bytearray()
            self._head.clear()
        elif self.phase in (Phase.HEADER, Phase.ROLE, Phase.START) and token != t.constrain:
            piece = self._piece(token)
            self._head.extend(piece)
            if self.phase is not Phase.START:
                self._name.extend(piece)
        elif self.phase is Phase.REASONING:
            self._n_reasoning += 1
