"""Decode speed with a JSON-schema grammar against without one, and a large schema's compile time.

Both sides run in this process on the same model and context, at the same sampling settings;
rounds alternate so that drift on a shared machine hits both alike. The free side continues
a text (nothing ends it early); the constrained side answers with JSON whose long string
field (``minLength``) makes it run as long. Prints decode tokens/s of each and the ratio (target >= 0.85),
then the time to turn a large schema into GBNF (llama-cpp-python's converter, uncached) and
to parse it in llama.cpp (the grammar sampler's creation).

    python benchmarks/grammar_speed.py [--model PATH] [--tokens 96] [--rounds 4] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from contextlib import closing
from typing import Any

from ggufllm import LLMService
from ggufllm.chunks import Answer
from ggufllm.config import GenerationConfig
from ggufllm.engine.sampling import Sampler, VocabView
from ggufllm.resolve import default_model_path
from ggufllm.structured.plan import GrammarSpec
from ggufllm.structured.schema import _gbnf_of, schema_to_gbnf

STORY = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 60},
    "story": {"type": "string", "minLength": 1000, "maxLength": 4000},  # runs to max_tokens
    "mood": {"enum": ["happy", "sad", "tense"]}}, "required": ["title", "story", "mood"]}


def large_schema(n_props: int = 120) -> dict[str, Any]:
    """A schema of the size real extraction tasks reach: many typed, nested, bounded fields."""
    item = {"type": "object", "properties": {
        "label": {"type": "string", "maxLength": 40},
        "score": {"type": "number"},
        "kind": {"enum": [f"k{i}" for i in range(12)]},
        "when": {"type": "string", "format": "date"}}, "required": ["label", "score", "kind"]}
    props: dict[str, Any] = {}
    for i in range(n_props):
        props[f"field_{i}"] = [
            {"type": "string", "maxLength": 200},
            {"type": "integer"},
            {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 8},
            {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]},
            {"type": "object", "properties": {"a": {"type": "boolean"},
                                              "b": {"type": "string", "format": "uuid"}},
             "required": ["a"]},
        ][i % 5]
    return {"type": "object", "properties": props, "required": list(props)[::2],
            "$defs": {"Item": item}}


def decode_rate(answer: Answer) -> tuple[int, float]:
    t = answer.timings
    assert t is not None
    return t.n_generated - 1, t.decode_s  # the first token comes with the prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None,
                    help="decode threads (1 is steadier on a busy machine) [default: all cores]")
    args = ap.parse_args()
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    path = args.model or default_model_path()
    params = dict(max_tokens=args.tokens, temperature=0.8, top_k=40, top_p=0.95)
    with LLMService(path, max_length=2048, n_parallel=1, n_threads=args.threads) as svc:
        free: list[tuple[int, float]] = []
        constrained: list[tuple[int, float]] = []
        for r in range(args.rounds + 1):  # round 0 warms both paths up
            with closing(svc.complete_stream("Once upon a time, in a city by the sea,",
                                             seed=r, **params)) as chunks:
                a = Answer.from_chunks(chunks)
            b = svc.answer("Write a long story about a dragon who learns to fly.",
                           response_format=STORY, seed=r, **params)
            if r:
                free.append(decode_rate(a))
                constrained.append(decode_rate(b))
        rate = lambda runs: sum(n for n, _ in runs) / sum(s for _, s in runs)  # noqa: E731
        f, c = rate(free), rate(constrained)
        per_round = [cn / cs / (fn / fs) for (fn, fs), (cn, cs) in zip(free, constrained,
                                                                        strict=True)]
        print(f"decode tokens/s without grammar: {f:.1f} ({sum(n for n, _ in free)} tokens)")
        print(f"decode tokens/s with JSON-schema grammar: {c:.1f} "
              f"({sum(n for n, _ in constrained)} tokens)")
        print(f"ratio: {c / f:.3f} (median of rounds {statistics.median(per_round):.3f}; "
              "target >= 0.85)")
        schema = large_schema()
        _gbnf_of.cache_clear()
        t0 = time.perf_counter()
        gbnf = schema_to_gbnf(schema)
        t1 = time.perf_counter()
        engine = svc._engine
        assert engine is not None
        vocab = VocabView(engine.model.vocab)
        sampler = Sampler(GenerationConfig(), vocab.n_vocab, vocab=vocab, grammar=GrammarSpec(gbnf))
        t2 = time.perf_counter()
        sampler.close()
        print(f"large schema ({len(schema['properties'])} properties, {len(gbnf)} bytes of "
              f"GBNF, {gbnf.count(' ::= ')} rules): schema -> GBNF {1000 * (t1 - t0):.1f} ms, "
              f"llama.cpp grammar parse {1000 * (t2 - t1):.1f} ms")


if __name__ == "__main__":
    main()
