"""The sampler built from parts, driven directly over a real llama.cpp context (Gemma 270M).

A grammar is llama.cpp's own sampler: eager (from the first token) or lazy (waiting for a
trigger token or pattern); greedy still follows it; the prompt never reaches it; and a
grammar llama.cpp cannot parse is a typed error, not a crash.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from ggufllm.config import GenerationConfig
from ggufllm.engine.native import Batch, NativeContext, NativeModel
from ggufllm.engine.sampling import Sampler, VocabView
from ggufllm.errors import InvalidParameterError
from ggufllm.structured.plan import GrammarSpec

PROMPT = "Question: What is the capital of France?\nAnswer:"


@pytest.fixture(scope="module")
def native(default_gguf: Path) -> Iterator[tuple[NativeModel, NativeContext]]:
    model = NativeModel(str(default_gguf), extra_buffers="off")
    ctx = NativeContext(model, n_ctx=256, n_batch=64, n_threads=None, flash_attn=None)
    yield model, ctx
    ctx.close()
    model.close()


def _generate(native: tuple[NativeModel, NativeContext], cfg: GenerationConfig,
              grammar: GrammarSpec | None, n: int = 12) -> list[int]:
    model, ctx = native
    ctx.clear()
    prompt = model.tokenize(PROMPT, add_special=True, parse_special=False)
    batch = Batch(64)
    try:
        for i, t in enumerate(prompt):
            batch.add(t, i, 0, i == len(prompt) - 1)
        assert ctx.decode(batch) == 0
        sampler = Sampler(cfg, model.n_vocab, vocab=VocabView(model.vocab), grammar=grammar)
        try:
            sampler.accept(prompt)  # the penalties' history; never the grammar
            out: list[int] = []
            row = batch.n - 1
            for pos in range(len(prompt), len(prompt) + n):
                token = sampler.sample(ctx, row)
                if model.is_eog(token):
                    break
                out.append(token)
                batch.clear()
                row = batch.add(token, pos, 0, True)
                assert ctx.decode(batch) == 0
            return out
        finally:
            sampler.close()
    finally:
        batch.close()


def _text(native: tuple[NativeModel, NativeContext], tokens: list[int]) -> str:
    return b"".join(native[0].piece(t) for t in tokens).decode("utf-8", "replace")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_an_eager_grammar_holds_from_the_first_token(native, temperature: float) -> None:
    cfg = GenerationConfig(temperature=temperature, seed=3, repeat_penalty=1.1)
    out = _generate(native, cfg, GrammarSpec('root ::= ("yes" | "no") " " [0-9]{2}'))
    assert re.fullmatch(r"(yes|no) [0-9]{2}", _text(native, out)), _text(native, out)


def test_greedy_with_a_grammar_picks_the_best_allowed_token(native) -> None:
    free = _generate(native, GenerationConfig(temperature=0.0), None, n=1)
    # a grammar that forbids the greedy choice: the next best allowed token comes instead
    first = _text(native, free)
    out = _generate(native, GenerationConfig(temperature=0.0), GrammarSpec('root ::= [0-9]+'), 4)
    assert out and _text(native, out).isdigit() and _text(native, out) != first


def test_a_lazy_grammar_waits_for_its_trigger(native) -> None:
    model = native[0]
    free = _generate(native, GenerationConfig(temperature=0.0), None, n=3)
    trigger = free[1]  # what greedy writes second: the grammar starts there
    piece = model.piece(trigger).decode()
    by_token = GrammarSpec(f'root ::= <[{trigger}]> "!" [0-9]', trigger_tokens=(trigger,))
    out = _generate(native, GenerationConfig(temperature=0.0), by_token)
    assert out[:2] == free[:2] and _text(native, out[2:]) and re.fullmatch(
        r"![0-9]", _text(native, out[2:])), _text(native, out)
    literal = piece.replace("\\", "\\\\").replace('"', '\\"')
    # std::regex (ECMAScript): escape its special characters only
    pattern = re.sub(r"([.^$|()*+?\[\]{}\\])", r"\\\1", piece)
    by_pattern = GrammarSpec(f'root ::= "{literal}" "#"', trigger_patterns=(f"({pattern})",))
    out = _generate(native, GenerationConfig(temperature=0.0), by_pattern)
    assert out[:2] == free[:2] and _text(native, out[2:]) == "#"


def test_a_grammar_llama_cpp_cannot_parse_is_a_typed_error(native) -> None:
    model = native[0]
    with pytest.raises(InvalidParameterError):
        Sampler(GenerationConfig(), model.n_vocab, vocab=VocabView(model.vocab),
                grammar=GrammarSpec("root ::= ("))
