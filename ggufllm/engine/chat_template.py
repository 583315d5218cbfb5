"""A model's own Jinja chat template, rendered so that user text stays text.

Chat templates come from model files, so they are untrusted code: they are
rendered in Jinja's immutable sandbox (CVE-2024-34359 was a template that
escaped a non-sandboxed environment), with what Hugging Face's renderer offers
real templates (``loopcontrols``, a ``tojson`` that keeps non-ASCII text,
``raise_exception``, ``strftime_now``).

The rendered text cannot simply be tokenized with special-token parsing: a
question or a RAG passage holding ``<|im_end|>`` or ``<end_of_turn>`` would
become a real control token and forge a turn. Every user-supplied message is
therefore wrapped in markers made of a per-render random nonce; after rendering,
the text between markers is a user span (tokenized as plain text) and the rest
is the template's own markup (tokenized with special parsing). A second render
with the plain messages must give the same text with the markers removed, which
proves the template passed every message through unchanged in its substance.
"""

from __future__ import annotations

import datetime as _dt
import json
import secrets
import string
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidParameterError, ModelLoadError
from ..harmony import Segment

__all__ = ["ChatTemplate"]


class _TemplateRaised(Exception):
    """``raise_exception(message)`` called by a template."""


def _raise(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Hugging Face's tojson: plain json.dumps (Jinja's own escapes <, >, & and ').
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _marker() -> str:
    # Upper-case letters survive trim, tojson, escape and upper; the nonce makes
    # a marker impossible to guess from user text.
    return "GGUFLLM" + "".join(secrets.choice(string.ascii_uppercase) for _ in range(20))


class ChatTemplate:
    """One model's chat template.

    Args:
        source: the template text (``tokenizer.chat_template``).
        path: the model file, named in errors.
        bos_token, eos_token: the texts the template may write for them.

    Raises:
        ModelLoadError: the template does not parse.
    """

    def __init__(self, source: str, path: str, bos_token: str, eos_token: str) -> None:
        self._path = path
        self._bos, self._eos = bos_token, eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        self._env = env
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ModelLoadError(path, [f"chat template does not parse: {exc}"]) from None

    def render(self, messages: Sequence[dict[str, str]],
               date: _dt.date | None = None) -> list[Segment]:
        """Renders ``messages`` ({role, content}) ready for the assistant's reply.

        Returns:
            The template's markup as ``special`` segments and every message's
            text as plain segments, in order.

        Raises:
            InvalidParameterError: the template refused the conversation
                (``raise_exception``, e.g. roles that do not alternate).
            ModelLoadError: the template failed, tried to leave its sandbox, or
                rewrote message text so that it cannot be kept apart from markup.
        """
        now = _dt.datetime.combine(date, _dt.time()) if date else _dt.datetime.now()
        open_, close = _marker(), _marker()
        # Messages as given first; then stripped, for templates that trim them
        # (the markers would keep the whitespace inside).
        for strip in (False, True):
            given = [{"role": m["role"], "content": m["content"].strip() if strip
                      else m["content"]} for m in messages]
            marked = [{**m, "content": f"{open_}{m['content']}{close}"} for m in given]
            segments = _split(self._call(marked, now), open_, close)
            if segments is not None and "".join(s.text for s in segments) == self._call(given, now):
                return segments
        raise ModelLoadError(self._path, ["the chat template rewrites message text, so user "
                                          "text cannot be kept apart from its markup"])

    def _call(self, messages: Sequence[dict[str, str]], now: _dt.datetime) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, bos_token=self._bos,
                eos_token=self._eos, strftime_now=now.strftime)
        except _TemplateRaised as exc:
            raise InvalidParameterError(f"the model's chat template refused the conversation: "
                                        f"{exc}", "turns") from None
        except SecurityError as exc:
            raise ModelLoadError(self._path, [f"chat template tried an unsafe operation: "
                                              f"{exc}"]) from None
        except Exception as exc:  # a broken template is a broken file, whatever it raised
            raise ModelLoadError(self._path, [f"chat template failed: "
                                              f"{type(exc).__name__}: {exc}"]) from None


def _split(text: str, open_: str, close: str) -> list[Segment] | None:
    """Markup and user spans; None when the markers do not pair up."""
    segments: list[Segment] = []
    pos = 0
    while (start := text.find(open_, pos)) >= 0:
        end = text.find(close, start)
        if end < 0 or open_ in text[start + len(open_):end]:
            return None
        segments.append(Segment(text[pos:start], special=True))
        segments.append(Segment(text[start + len(open_):end]))
        pos = end + len(close)
    segments.append(Segment(text[pos:], special=True))
    if any(close in s.text for s in segments if s.special):
        return None
    return [s for s in segments if s.text]
