"""Probes that rule groups of tokens out of a whole-vocabulary grammar mask
(``ggufllm.engine.prefixes``) never rule out a token llama.cpp's grammar allows.

Differential: along real token sequences (JSON with accents, CJK and emoji, which the
tokenizers split into byte tokens mid-character; a harmony reply naming control tokens by
id), the tokens allowed among the probes' candidates are the tokens llama.cpp allows among
the whole vocabulary, on Gemma's SentencePiece vocabulary (262k) and on o200k_harmony (201k).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp.llama_cpp as lib
import numpy as np
import pytest

from ggufllm.config import GenerationConfig
from ggufllm.engine import prefixes
from ggufllm.engine.native import NativeModel
from ggufllm.engine.prefixes import Utf8State, named_tokens
from ggufllm.engine.sampling import Sampler, VocabView
from ggufllm.structured.plan import GrammarSpec
from ggufllm.structured.schema import schema_to_gbnf

SCHEMA = {"type": "object", "required": ["city", "tags", "n"],
          "properties": {"city": {"type": "string"}, "n": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
ANSWER = '{"city": "Zürich – café 東京 🙂", "n": -42, "tags": ["a b", "ü"]}'


def test_named_tokens_are_read_outside_literals_classes_and_comments() -> None:
    assert named_tokens('root ::= <[200005]> "a<b" [<>] x !<[7]> # <not a token>\n') == {
        200005, 7}
    assert named_tokens('root ::= "\\"<" [\\]<] "x"') == frozenset()
    assert named_tokens("root ::= <|start|> x") is None  # a token named by its text
    assert named_tokens('root ::= "a" # c\r x ::= <foo>\n') is None  # \r ends a comment


def test_utf8_state_follows_llama_cpps_decoder() -> None:
    state = Utf8State()
    assert state.between_sequences
    for piece, between in [(b"ab", True), ("é".encode()[:1], False), ("é".encode()[1:], True),
                           ("東".encode()[:2], False), ("東".encode()[2:] + b"x", True)]:
        state.feed(piece)
        assert state.between_sequences is between, piece
    state.feed("é".encode()[:1])
    state.feed(b"a")  # not a continuation byte: invalid, and the next token starts afresh
    assert state.between_sequences
    state.feed(b"\x80")  # not a lead byte: the same
    assert state.between_sequences


@pytest.fixture(scope="module")
def gemma_vocab(default_gguf: Path) -> Iterator[NativeModel]:
    model = NativeModel(str(default_gguf), vocab_only=True)
    yield model
    model.close()


@pytest.fixture(autouse=True)
def index_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probes from the first whole-vocabulary mask (in use: after BUILD_AFTER of them)."""
    monkeypatch.setattr(prefixes, "BUILD_AFTER", 0)


def _walk(model: NativeModel, grammar: str | GrammarSpec, tokens: list[int]) -> list[int]:
    """At each step of ``tokens``: the probes' candidates hold every allowed token. Returns
    the candidate counts of the steps where probes were used."""
    cfg = GenerationConfig(temperature=1.0, top_k=50)
    spec = grammar if isinstance(grammar, GrammarSpec) else GrammarSpec(grammar)
    VocabView(model.vocab).prepare()  # as the engine does before queueing the request
    sampler = Sampler(cfg, model.n_vocab, vocab=VocabView(model.vocab), grammar=spec)
    everything = np.arange(model.n_vocab, dtype=np.int32)
    used = []
    try:
        for token in [*tokens, None]:  # None: after the last token (the grammar may end)
            allowed = everything[sampler._allows(everything)]
            candidates = sampler._whole_vocabulary()
            if len(candidates) < model.n_vocab:
                used.append(len(candidates))
            assert np.isin(allowed, candidates).all(), (
                [model.piece(int(t), True) for t in allowed[~np.isin(allowed, candidates)]][:8])
            if token is None:
                break
            assert token in allowed, model.piece(token, True)
            lib.llama_sampler_accept(sampler._grammar, token)
            sampler._utf8.feed(VocabView(model.vocab).piece(token))
    finally:
        sampler.close()
    return used


@pytest.mark.parametrize("model_name", ["gemma", "o200k"])
def test_probes_never_rule_out_an_allowed_token(model_name: str, request) -> None:
    model = request.getfixturevalue("gemma_vocab" if model_name == "gemma" else "tiny_vocab")
    tokens = model.tokenize(ANSWER, add_special=False, parse_special=False)
    used = _walk(model, schema_to_gbnf(SCHEMA), tokens)
    # structural positions: a few thousand candidates at most instead of 200k+
    assert used and min(used) < model.n_vocab // 20, used


def test_tokens_named_by_id_stay_candidates(tiny_vocab) -> None:
    model = tiny_vocab
    channel, message, start = (model.tokenize(t, add_special=False, parse_special=True)[0]
                               for t in ("<|channel|>", "<|message|>", "<|start|>"))
    final = model.tokenize("final", add_special=False, parse_special=False)
    gbnf = (f'root ::= <[{channel}]> "final" <[{message}]> body\n'
            f'body ::= "{{" [^"<]* "}}" | !<[{start}]> "!"\n')
    body = model.tokenize('{ok: ü}', add_special=False, parse_special=False)
    _walk(model, gbnf, [channel, *final, message, *body])


def test_a_lazy_grammar_triggered_after_split_characters(tiny_vocab) -> None:
    """Text before the trigger (CJK and an emoji, split into byte tokens) is followed too:
    the grammar starts from its trigger between UTF-8 sequences."""
    model = tiny_vocab
    spec = GrammarSpec(schema_to_gbnf(SCHEMA), trigger_patterns=(r"[\s\S]*?(\{[\s\S]*)",))
    before = model.tokenize("Voilà 東京 🙂: ", add_special=False, parse_special=False)
    after = model.tokenize(ANSWER, add_special=False, parse_special=False)
    assert _walk(model, spec, before + after)


def test_seeded_answers_are_the_same_with_and_without_probes(tiny_gguf, monkeypatch) -> None:
    """The random-weight gpt-oss fixture has its first draw refused at nearly every
    punctuation step: the same seeds give the same tokens whether those steps mask the whole
    vocabulary or the probes' candidates."""
    from ggufllm import LLMService

    schema = {"type": "object", "required": ["city", "n"], "properties": {
        "city": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}}}
    import threading

    probed, builders = [], []
    candidates, build = prefixes.PrefixIndex.candidates, prefixes.build_index

    def counted(self, *args):  # type: ignore[no-untyped-def]
        keep = candidates(self, *args)
        probed.append(keep is not None)
        return keep

    def recorded(*args):  # type: ignore[no-untyped-def]
        builders.append(threading.current_thread().name)
        return build(*args)

    monkeypatch.setattr(prefixes.PrefixIndex, "candidates", counted)
    monkeypatch.setattr(prefixes, "build_index", recorded)
    answers = {}
    with LLMService(tiny_gguf("q8_0"), max_length=512, n_parallel=1) as svc:  # a fresh load
        for build_after in (10**9, 0):
            monkeypatch.setattr(prefixes, "BUILD_AFTER", build_after)
            answers[build_after] = [
                svc.answer("Describe a city.", response_format=schema, temperature=1.0,
                           seed=seed, max_tokens=80, reasoning_budget=4).token_ids
                for seed in (1, 2)]
    assert answers[0] == answers[10**9]
    assert sum(probed) >= 5, probed  # the probed side did use probes
    # built on the caller's thread before its request was queued, never on the decoding one
    assert builders == [threading.current_thread().name]


def test_a_token_named_by_id_is_never_a_probe(gemma_vocab) -> None:
    """``!<[ab]>`` allows every token but "ab": asked as a probe, "ab"'s refusal would rule
    out "able", "about"... which the grammar allows."""
    model = gemma_vocab
    ab = [t for t in model.tokenize("ab", add_special=False, parse_special=False)]
    assert len(ab) == 1 and model.piece(ab[0], True) == b"ab"
    a = model.tokenize("a", add_special=False, parse_special=False)
    _walk(model, f'root ::= "a" !<[{ab[0]}]>', a)


def _fake_pieces() -> list[bytes]:
    emoji = "🙂🦩".encode()  # two 4-byte code points: an 8-byte key
    return [b"a", b"ab", b"abc", b"b", b"\x00x", b"", b"\x80a", b"\xc0\x80z", "é".encode(),
            "éa".encode(), "é".encode() + b"\x00", emoji[:4], emoji, emoji + b"!", b"ab",
            "東".encode()[:2], b"<|end|>"]


@pytest.mark.parametrize("alphabet", ["a", "ab", "é🙂", "🙂🦩!", "b<|end>", ""])
def test_an_index_keeps_every_token_a_prefix_closed_rule_allows(alphabet: str) -> None:
    """On made-up texts (NUL bytes, an empty text, stray continuation and overlong bytes, an
    8-byte key, a duplicate, a cut character): a rule that allows a text exactly when every
    code point is in ``alphabet`` (so it allows each prefix of what it allows, as a grammar
    does) keeps every token it allows among the candidates."""
    from ggufllm.engine.prefixes import build_index

    pieces = _fake_pieces()
    end = len(pieces) - 1  # "<|end|>": a control token, always a candidate

    def rule(piece: bytes) -> bool:
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return bool(text) and "\x00" not in text and all(c in alphabet for c in text)

    index = build_index(pieces, [end])
    for groups, probes in ((index.first, index.first_probe), (index.second, index.second_probe)):
        for token, group in enumerate(groups):  # a group's tokens start with its probe's text
            if group >= 0 and probes[group] >= 0:
                assert pieces[token].startswith(pieces[probes[group]]), (token, group)
    allows = lambda ids: np.array([rule(pieces[i]) for i in ids], dtype=bool)  # noqa: E731
    keep = index.candidates(allows, frozenset())
    if keep is None:  # probes stepped aside: every token is a candidate
        return
    kept = {i for i in range(len(pieces)) if keep[i]}
    assert {i for i, p in enumerate(pieces) if rule(p)} <= kept, [pieces[i] for i in kept]
    assert end in kept


def test_a_vocabulary_without_two_code_point_tokens_builds() -> None:
    from ggufllm.engine.prefixes import build_index

    for pieces in ([b"a", b"b", b"c"], [b"", b"\x80"], []):
        index = build_index(pieces, [])
        keep = index.candidates(lambda ids: np.zeros(len(ids), dtype=bool), frozenset())
        assert keep is None or len(keep) == len(pieces)


def test_what_a_vocabulary_remembers_is_forgotten_when_its_model_closes(default_gguf) -> None:
    from ggufllm.engine import vocab_memo

    model = NativeModel(str(default_gguf), vocab_only=True)
    vocab = model.vocab
    assert vocab_memo.remember(vocab, "x", lambda: 1) == 1
    assert vocab_memo.remember(vocab, "x", lambda: 2) == 1
    model.close()
    assert vocab_memo.remember(vocab, "x", lambda: 3) == 3  # another model may live here now
    vocab_memo.forget(vocab)
