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


def test_utf8_state_follows_llama_cpps_decoder() -> None:
    state = Utf8State()
    assert state.between_sequences
    for piece, between in [(b"ab", True), ("é".encode()[:1], False), ("é".encode()[1:], True),
                           ("東".encode()[:2], False), ("東".encode()[2:] + b"x", True)]:
        state.feed(piece)
        assert state.between_sequences is between, piece
    state.feed(b"\x80")  # not a lead byte: llama.cpp's state is no longer followed
    assert not state.between_sequences
    state.feed(b"a")
    assert not state.between_sequences


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
    sampler = Sampler(cfg, model.n_vocab, vocab=VocabView(model.vocab), grammar=spec)
    everything = np.arange(model.n_vocab, dtype=np.int32)
    used = []
    try:
        for token in tokens:
            allowed = everything[sampler._allows(everything)]
            candidates = sampler._whole_vocabulary()
            if len(candidates) < model.n_vocab:
                used.append(len(candidates))
            assert np.isin(allowed, candidates).all(), (
                [model.piece(int(t), True) for t in allowed[~np.isin(allowed, candidates)]][:8])
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
    probed = []
    candidates = prefixes.PrefixIndex.candidates

    def counted(self, *args):  # type: ignore[no-untyped-def]
        keep = candidates(self, *args)
        probed.append(keep is not None)
        return keep

    monkeypatch.setattr(prefixes.PrefixIndex, "candidates", counted)
    answers = {}
    with LLMService(tiny_gguf("q8_0"), max_length=512, n_parallel=1) as svc:
        for build_after in (10**9, 0):
            monkeypatch.setattr(prefixes, "BUILD_AFTER", build_after)
            answers[build_after] = [
                svc.answer("Describe a city.", response_format=schema, temperature=1.0,
                           seed=seed, max_tokens=80, reasoning_budget=4).token_ids
                for seed in (1, 2)]
    assert answers[0] == answers[10**9]
    assert sum(probed) >= 5, probed  # the probed side did use probes
