"""Affinity keys: the pages of a request's prompt prefix, as hashes a router can compare.

A request's key is the chain of hashes of its leading text, cut in pages of
:data:`PAGE_CHARS` characters: ``key[i]`` stands for the first ``i + 1`` pages
(each hash covers the one before it), so two requests share ``key[:n]`` exactly
when their first ``n`` pages of text are the same. The router keeps, for each
hash, the replica that served it last; the longest shared run names the replica
whose KV cache holds most of this prompt.

Why text and not tokens: the engine reuses its KV cache in pages of
``ggufllm.engine.slots.PAGE`` (64) tokens, and the rule here is the same one at
about 4 characters a token (``PAGE_CHARS`` = 256). Tokenizing in the router
would need the model's vocabulary in the ingress process (hundreds of MB for
gpt-oss's 200k tokens, and the chat template), for an answer that only has to
say which replica holds more of a prefix: a shared document (thousands of
characters) gives the same decision either way; only the last partial page
differs, and it is never counted (as the engine never counts a partial page as
exact). Text is taken in the order the prompt renders it: the instructions
(system/developer messages), then the turns, for chat; the context, then the
question, for ``/answer``; the raw prompt for completions.

Nothing here imports Ray or the engine: it runs in the ingress, per request.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["PAGE_CHARS", "CHARS_PER_TOKEN", "MAX_PAGES", "prefix_text", "prefix_keys"]

# the engine's PAGE (64 tokens, ggufllm/engine/slots.py) at ~4 characters a token of
# English text (tests/test_ray.py checks the two stay in step)
CHARS_PER_TOKEN = 4
PAGE_CHARS = 64 * CHARS_PER_TOKEN
# a prompt's first 256 pages (~16k tokens) are hashed: enough to tell documents apart,
# bounded work per request
MAX_PAGES = 256
_SEP = "\x1e"  # between parts: "ab" + "c" and "a" + "bc" are different prompts


def _text(content: Any) -> str:
    """A message's content: a string, or OpenAI's list of ``{"type": "text", "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prefix_text(path: str, body: Any) -> str | None:
    """The text a request's prompt starts with, in rendering order; None when the request
    generates nothing (or its body is not one a route takes: the replica will say why).

    Args:
        path: the URL path (``/v1/chat/completions``, ``/v1/completions``, ``/answer``).
        body: the parsed JSON body.
    """
    if not isinstance(body, dict):
        return None
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        roles = [(m.get("role"), _text(m.get("content"))) for m in messages if isinstance(m, dict)]
        # the app puts system/developer messages first, as the instructions (server/chat.py)
        first = [t for r, t in roles if r in ("system", "developer")]
        turns = [f"{r}:{t}" for r, t in roles if r in ("user", "assistant")]
        return _SEP.join(["\n\n".join(first), *turns])
    if path.endswith("/completions"):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        return prompt if isinstance(prompt, str) else None
    if path.endswith("/answer"):
        question, context = body.get("question"), body.get("context")
        if not isinstance(question, str):
            return None
        return _SEP.join([context if isinstance(context, str) else "", question])
    return None


def prefix_keys(path: str, raw_body: bytes) -> tuple[bytes, ...]:
    """The page hashes of a request's prompt prefix (empty: no affinity, route by load).

    Args:
        path: the URL path.
        raw_body: the request body as received (JSON; anything else has no key).

    Returns:
        One 8-byte hash per whole page of :data:`PAGE_CHARS` characters, each
        covering all the pages before it; the last partial page is left out.
    """
    try:
        text = prefix_text(path, json.loads(raw_body)) if raw_body else None
    except (ValueError, UnicodeDecodeError):
        return ()
    if not text:
        return ()
    keys: list[bytes] = []
    previous = b""
    n_pages = min(len(text) // PAGE_CHARS, MAX_PAGES)
    # pages are cut on characters (what the page rule counts), hashed as their UTF-8 bytes
    for i in range(n_pages):
        page = text[i * PAGE_CHARS:(i + 1) * PAGE_CHARS].encode("utf-8", "surrogatepass")
        previous = hashlib.blake2b(previous + page, digest_size=8).digest()
        keys.append(previous)
    return tuple(keys)
