"""Prompt formats: harmony for gpt-oss, the model's own chat template, or plain completion.

Chat templates come from model files, so they are untrusted code: they are
rendered in Jinja's immutable sandbox (CVE-2024-34359 was a template that
escaped a non-sandboxed environment).
"""

from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..config import GenerationConfig
from ..errors import ModelLoadError
from ..harmony import DEFAULT_INSTRUCTIONS, HarmonyTokens, Segment, Turn, render_conversation
from .native import NativeModel

__all__ = ["PromptKind", "PromptBuilder", "Prompt"]

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


def _raise(message: str) -> None:
    raise TemplateError(message)


class PromptBuilder:
    """Builds prompts for one model in the format it was trained on.

    Args:
        model: the loaded model (its vocabulary and metadata).
        architecture: ``general.architecture`` of the file.
    """

    def __init__(self, model: NativeModel, architecture: str) -> None:
        self._model = model
        self.harmony: HarmonyTokens | None = None
        self._template = None
        if architecture == "gpt-oss":
            self.harmony = HarmonyTokens.from_lookup(model.special_token_id)
        if self.harmony is not None:
            self.kind = PromptKind.HARMONY
            return
        source = model.meta("tokenizer.chat_template")
        if source:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals.update(raise_exception=_raise,
                               strftime_now=lambda fmt: _dt.datetime.now().strftime(fmt))
            try:
                self._template = env.from_string(source)
            except TemplateError as exc:
                raise ModelLoadError(model.path, [f"chat template does not parse: {exc}"]) from None
            self.kind = PromptKind.CHAT_TEMPLATE
        else:
            self.kind = PromptKind.COMPLETION

    def build(self, turns: Sequence[Turn], cfg: GenerationConfig,
              instructions: str | None = None) -> Prompt:
        """Renders and tokenizes a conversation that ends with the user's turn."""
        if self.kind is PromptKind.HARMONY:
            segments = render_conversation(turns, reasoning_effort=cfg.reasoning_effort,
                                           instructions=instructions or DEFAULT_INSTRUCTIONS)
            return Prompt(self._tokenize_segments(segments), cfg.stop)
        if self.kind is PromptKind.CHAT_TEMPLATE:
            return Prompt(self._render_template(turns, instructions), cfg.stop)
        return Prompt(self._completion(turns, instructions), _COMPLETION_STOPS + cfg.stop)

    def _tokenize_segments(self, segments: Sequence[Segment]) -> list[int]:
        m = self._model
        tokens: list[int] = []
        for seg in segments:
            tokens += m.tokenize(seg.text, add_special=False, parse_special=seg.special)
        return tokens

    def _render_template(self, turns: Sequence[Turn], instructions: str | None) -> list[int]:
        m = self._model
        messages = [{"role": t.role, "content": t.content} for t in turns]
        if instructions:
            messages.insert(0, {"role": "system", "content": instructions})
        bos = m.piece(m.bos_id, special=True).decode("utf-8", "replace") if m.bos_id >= 0 else ""
        eos = m.piece(m.eos_id, special=True).decode("utf-8", "replace") if m.eos_id >= 0 else ""
        assert self._template is not None
        try:
            text = self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=bos, eos_token=eos)
        except TemplateError as exc:
            raise ModelLoadError(m.path, [f"chat template failed: {exc}"]) from None
        # The template writes the BOS itself when it wants one.
        add_bos = m.add_bos and not (bos and text.startswith(bos))
        return m.tokenize(text, add_special=add_bos, parse_special=True)

    def _completion(self, turns: Sequence[Turn], instructions: str | None = None) -> list[int]:
        """A question/answer document: instructions, the worked examples, then the turns."""
        parts: list[str] = [f"{instructions.strip()}\n\n"] if instructions else []
        parts.append(_COMPLETION_FRAME)
        for turn in turns:
            content = turn.content.strip()
            if turn.role == "assistant":
                parts.append(f" {content}\n\n")
                continue
            if turn.role in ("system", "developer"):
                parts.append(f"{content}\n\n")
                continue
            if "Question:" not in content:
                content = f"Question: {content}"
            parts.append(f"{content}\nAnswer:")
        text = "".join(parts)
        return self._model.tokenize(text, add_special=self._model.add_bos, parse_special=False)
