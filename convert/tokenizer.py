"""A byte-level BPE ``tokenizer.json`` as GGUF vocabulary metadata (llama.cpp's ``gpt2`` model)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from ggufllm.errors import ConversionError

__all__ = ["Vocab", "read_vocab"]


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # "bos", "eos", "pad", "unk" -> id
    add_bos: bool
    add_eos: bool


def _token_id(content: Any, lookup: dict[str, int]) -> int | None:
    if isinstance(content, dict):  # {"content": "<|return|>", ...}
        content = content.get("content")
    return lookup.get(content) if isinstance(content, str) else None


def read_vocab(tokenizer_json: Path, tokenizer_config: dict[str, Any], vocab_size: int) -> Vocab:
    """Reads the vocabulary, padding ids the file does not name up to ``vocab_size``.

    Raises:
        ConversionError: not a byte-level BPE tokenizer, or ids out of range.
    """
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ConversionError(f"tokenizer.json: model type {model.get('type')!r}, expected BPE")
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    problems = []
    for text, i in model["vocab"].items():
        if not 0 <= i < vocab_size:
            problems.append(f"token {text!r} has id {i}, outside the vocabulary of {vocab_size}")
            continue
        tokens[i] = text
    for added in data.get("added_tokens", []):
        i = added["id"]
        if not 0 <= i < vocab_size:
            problems.append(f"added token {added['content']!r} has id {i}, outside the vocabulary")
            continue
        tokens[i] = added["content"]
        types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if problems:
        raise ConversionError(problems)
    for i, t in enumerate(tokens):
        if t is None:  # llama.cpp's convention for ids the tokenizer leaves unnamed
            tokens[i] = f"[PAD{i}]"
            types[i] = gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    lookup = {t: i for i, t in enumerate(tokens) if t is not None}
    special = {}
    for role in ("bos", "eos", "pad", "unk"):
        i = _token_id(tokenizer_config.get(f"{role}_token"), lookup)
        if i is not None:
            special[role] = i
    return Vocab([t for t in tokens if t is not None], [int(t) for t in types], merges, special,
                 bool(tokenizer_config.get("add_bos_token", False)),
                 bool(tokenizer_config.get("add_eos_token", False)))
