"""Which tokens a grammar could still allow, found from a few hundred probes instead of
every token of the vocabulary.

When a refused draw needs the allowed tokens of the whole vocabulary, llama.cpp decodes
and matches each of its 200-260k tokens (~25 ms on one core). Most are refused by their
first character or two. A token is allowed only if its text's first code point (and its
first two) would be allowed alone: llama.cpp matches a token's code points one by one, and
a token that ends after matching them is allowed wherever it got to (with no UTF-8
sequence left open). So each token whose text is exactly one code point, or two, is a
*probe* for every token starting with that text; a refused probe rules its whole group out
without matching it. Only the rest is masked by llama.cpp, which decides as before.

Where that reasoning does not hold, tokens stay candidates: end-of-generation and control
tokens, tokens whose text does not start with complete UTF-8 sequences, tokens the grammar
names by id (``<[id]>``, matched by id, not by text) — and the whole vocabulary when the
grammar names a token by its text, or when the text written so far ends inside a UTF-8
sequence (:class:`Utf8State`): there the next bytes complete that sequence, which is not the
start-of-text reasoning above (llama.cpp then refuses a probe and its tokens alike, but the
probes do not rely on how it treats an open sequence).
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import llama_cpp.llama_cpp as lib
import numpy as np

from .vocab_memo import known, remember

__all__ = ["PrefixIndex", "Utf8State", "build_index", "build_wanted_index", "named_tokens",
           "pieces", "prefix_index"]

# UTF-8 sequence length by a lead byte's high nibble, as llama.cpp's decoder reads it
# (0: not a lead byte); the bytes after a lead byte are taken as its continuation unchecked
_LENGTH = (1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 3, 4)


class Utf8State:
    """Whether the text a grammar has matched so far ends between UTF-8 sequences, followed
    as llama.cpp's decoder follows it (``decode_utf8``) over each accepted token's text: a
    sequence left open waits for the next token's bytes; after an invalid one, the next token
    decodes afresh."""

    def __init__(self) -> None:
        self._remain = 0  # continuation bytes still expected; -1: an invalid sequence

    @property
    def between_sequences(self) -> bool:
        return self._remain <= 0

    def feed(self, piece: bytes) -> None:
        remain, pos = self._remain, 0
        while pos < len(piece) and piece[pos] != 0 and remain > 0:
            if piece[pos] >> 6 != 2:
                self._remain = -1
                return
            pos, remain = pos + 1, remain - 1
        while pos < len(piece) and piece[pos] != 0:
            remain = _LENGTH[piece[pos] >> 4] - 1
            if remain < 0:
                self._remain = -1
                return
            pos += 1
            while pos < len(piece) and piece[pos] != 0 and remain > 0:
                pos, remain = pos + 1, remain - 1
        self._remain = remain


_TOKEN_REF = re.compile(rb"<\[(\d+)\]>")


def named_tokens(gbnf: str) -> frozenset[int] | None:
    """The token ids a GBNF grammar names (``<[id]>``, ``!<[id]>``), or None when it names
    a token by its text (``<text>``), which a probe cannot stand for."""
    text, ids, i = gbnf.encode(), set(), 0
    while i < len(text):
        c = text[i:i + 1]
        if c == b"#":  # a comment, to the end of the line (llama.cpp: \r or \n)
            ends = [j for j in (text.find(b"\n", i), text.find(b"\r", i)) if j >= 0]
            i = min(ends) + 1 if ends else len(text)
        elif c in (b'"', b"["):  # a literal or a character class: skip to its end
            close, i = (b'"' if c == b'"' else b"]"), i + 1
            while i < len(text) and text[i:i + 1] != close:
                i += 2 if text[i:i + 1] == b"\\" else 1
            i += 1
        elif c == b"<":
            ref = _TOKEN_REF.match(text, i)
            if ref is None:
                return None
            ids.add(int(ref.group(1)))
            i = ref.end()
        else:
            i += 1
    return frozenset(ids)


@dataclass(frozen=True)
class PrefixIndex:
    """A vocabulary's tokens grouped by their first code point and their first two.

    Attributes:
        first: each token's first-code-point group; -1: always a candidate.
        first_probe: each such group's probe token (its whole text is the group's prefix).
        second: each token's two-code-point group; -1: none (shorter, or no probe).
        second_probe: each such group's probe.
        second_parent: each such group's first-code-point group.
        alphanumeric: the first-code-point groups of the letters and digits (ASCII): a
            quick look at whether most characters are allowed here.
    """

    first: np.ndarray
    first_probe: np.ndarray
    second: np.ndarray
    second_probe: np.ndarray
    second_parent: np.ndarray
    alphanumeric: np.ndarray

    def candidates(self, allows: Callable[[np.ndarray], np.ndarray],
                   named: frozenset[int]) -> np.ndarray | None:
        """The mask of the tokens that probes do not rule out; None where the grammar allows
        most characters (inside a string), where probing would cost more than it saves.

        Args:
            allows: the grammar's verdict on some tokens (a boolean per token given).
            named: tokens the grammar names by id: candidates, and never probes.
        """
        named_ids = np.fromiter(named, dtype=np.int64, count=len(named))
        sample = self.first_probe[self.alphanumeric]
        sample = sample[(sample >= 0) & ~np.isin(sample, named_ids)]
        if len(sample) and np.count_nonzero(allows(sample)) * 4 >= len(sample) * 3:
            return None

        def verdicts(probes: np.ndarray, asked: np.ndarray) -> np.ndarray:
            """Each group's verdict, then True for group -1 (an ungrouped token)."""
            ok = np.ones(len(probes) + 1, dtype=bool)  # no probe: never ruled out
            asked = asked & (probes >= 0) & ~np.isin(probes, named_ids)
            if asked.any():
                ok[:-1][asked] = allows(probes[asked])
            return ok

        first_ok = verdicts(self.first_probe, np.ones(len(self.first_probe), dtype=bool))
        keep = first_ok[self.first]
        if np.count_nonzero(keep) > len(keep) // 2:
            return None
        second_ok = verdicts(self.second_probe, first_ok[self.second_parent])
        keep &= second_ok[self.second]  # end-of-generation and control tokens: ungrouped
        keep[named_ids[named_ids < len(keep)]] = True
        return keep


def pieces(vocab: object, tokens: Iterable[int]) -> list[bytes]:
    """Each token's text as llama.cpp's grammar reads it (``token_to_piece``, special)."""
    size = 256
    buf = ctypes.create_string_buffer(size)
    out = []
    for token in tokens:
        n = lib.llama_token_to_piece(vocab, token, buf, size, 0, True)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(vocab, token, big, -n, 0, True)
            out.append(big.raw[:max(n, 0)])
        else:
            out.append(buf.raw[:n])
    return out


def build_index(texts: Sequence[bytes], always: Iterable[int]) -> PrefixIndex:
    """The index of a vocabulary whose tokens' texts are ``texts``."""
    n_vocab = len(texts)
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n_vocab)
    data = np.frombuffer(b"".join(texts) + bytes(8), dtype=np.uint8)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    size_of = np.array(_LENGTH, dtype=np.int64)

    def sequence(offset: np.ndarray) -> np.ndarray:
        """The byte length of each token's complete code point at ``offset`` (0: none)."""
        pos = starts + offset
        lead = data[pos]
        size = size_of[lead >> 4]
        ok = (size > 0) & (lead != 0) & (offset + size <= lengths)
        for k in range(1, 4):  # llama.cpp's decoder stops at a NUL byte
            ok &= ~((k < size) & (data[np.minimum(pos + k, len(data) - 1)] == 0))
        return np.where(ok, size, 0)

    always_ids = np.array(sorted(set(always)), dtype=np.int64)
    one = sequence(np.zeros(n_vocab, dtype=np.int64))
    one[always_ids[always_ids < n_vocab]] = 0
    two = np.where(one > 0, sequence(one), 0)
    raw = data[starts[:, None] + np.arange(8)]  # each token's first 8 bytes (padded)

    def groups(size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(each token's group by its first ``size`` bytes, -1: none; each group's probe)."""
        grouped = np.flatnonzero(size > 0)
        keys = np.where(np.arange(8) < size[grouped, None], raw[grouped], 0)
        keys = keys.view(np.uint64).ravel()  # no NUL inside a key: zero padding is unique
        unique, inverse = np.unique(keys, return_inverse=True)
        group = np.full(n_vocab, -1, dtype=np.int32)
        group[grouped] = inverse
        probe = np.full(len(unique), -1, dtype=np.int32)
        exact = grouped[lengths[grouped] == size[grouped]]  # the whole text is the prefix
        probe[group[exact]] = exact
        return group, probe

    first, first_probe = groups(one)
    second, second_probe = groups(np.where(two > 0, one + two, 0))
    parent = np.zeros(len(second_probe), dtype=np.int32)
    paired = np.flatnonzero(second >= 0)
    parent[second[paired]] = first[paired]
    # a two-code-point group without a probe rules nothing out: its tokens are not grouped
    second = np.where(np.append(second_probe, -1)[second] >= 0, second, -1)
    single = np.flatnonzero((lengths == 1) & (one == 1))
    alnum = np.frombuffer(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                          dtype=np.uint8)
    letters = np.unique(first[single[np.isin(data[starts[single]], alnum)]])
    arrays = [first, first_probe, second.astype(np.int32), second_probe, parent,
              letters.astype(np.int32)]
    for a in arrays:  # shared by every sampler of the vocabulary
        a.setflags(write=False)
    return PrefixIndex(*arrays)


# Building an index reads every token's text through llama.cpp (~0.5-1 s for 200-260k
# tokens), about as long as 30 whole-vocabulary masks: a vocabulary gets one once it has
# needed that many (a model that rarely draws a refused token never pays for it; one that
# keeps doing so pays at most twice what it would have with an index from the start).
BUILD_AFTER = 32

_count_lock = threading.Lock()


def _masks(vocab: object) -> list[int]:
    return remember(vocab, "whole-vocabulary masks", lambda: [0])


def prefix_index(vocab: object) -> PrefixIndex | None:
    """The vocabulary's index for a whole-vocabulary mask about to be made (counted), or None
    while none was built. Never builds one: the thread that decodes every request calls it.

    Args:
        vocab: the ``llama_vocab`` pointer.
    """
    masks = _masks(vocab)
    with _count_lock:
        masks[0] += 1
    return known(vocab, "prefix index")


def build_wanted_index(vocab: object, n_vocab: int,
                       always: Callable[[], Iterable[int]]) -> None:
    """Builds the vocabulary's index once it has needed :data:`BUILD_AFTER` whole-vocabulary
    masks (once per model load, :mod:`.vocab_memo`). Called on a request's own thread before
    the request is queued, as the vocabulary's first scan is, never on the decoding thread.

    Args:
        vocab: the ``llama_vocab`` pointer.
        n_vocab: its size.
        always: the tokens that stay candidates (end of generation, control tokens).
    """
    if _masks(vocab)[0] >= BUILD_AFTER:
        remember(vocab, "prefix index", lambda: build_index(pieces(vocab, range(n_vocab)), always()))
