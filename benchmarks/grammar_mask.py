"""The cost of masking the whole vocabulary with a JSON-schema grammar, with the probes of
``ggufllm.engine.prefixes`` against llama.cpp's mask of every token.

Walks the tokens of a JSON answer; at each step both sides mask (alternating which goes
first) and the allowed sets are compared (they must be equal). Steps are split into
punctuation (where the probes rule most tokens out) and string content (where they step
aside). Also prints the index's one-time build.

    python benchmarks/grammar_mask.py [--model PATH ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import llama_cpp.llama_cpp as lib
import numpy as np

from ggufllm.config import GenerationConfig
from ggufllm.engine import prefixes
from ggufllm.engine.native import NativeModel
from ggufllm.engine.sampling import Sampler, VocabView
from ggufllm.resolve import default_model_path
from ggufllm.structured.plan import GrammarSpec
from ggufllm.structured.schema import schema_to_gbnf

SCHEMA = {"type": "object", "required": ["city", "n", "tags"],
          "properties": {"city": {"type": "string"}, "n": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
ANSWER = '{"city": "Zürich, by the lake", "n": -42, "tags": ["a b", "old town", "ü"]}'


def measure(path: str) -> None:
    model = NativeModel(path, vocab_only=True)
    vocab = VocabView(model.vocab)
    prefixes.BUILD_AFTER = 0
    t = time.perf_counter()
    vocab.prepare()  # as the engine does before queueing a constrained request
    build = time.perf_counter() - t
    sampler = Sampler(GenerationConfig(temperature=1.0), model.n_vocab, vocab=vocab,
                      grammar=GrammarSpec(schema_to_gbnf(SCHEMA)))
    every = np.arange(model.n_vocab, dtype=np.int32)
    try:
        steps: dict[str, list[tuple[float, float]]] = {"punctuation": [], "string": []}
        for i, token in enumerate(model.tokenize(ANSWER, add_special=False,
                                                 parse_special=False)):
            sides = {}
            for side in (("full", "probed") if i % 2 else ("probed", "full")):
                t = time.perf_counter()
                ids = every if side == "full" else sampler._whole_vocabulary()
                verdicts = sampler._allows(ids)
                spent = time.perf_counter() - t
                sides[side] = (spent, set(ids[verdicts].tolist()), len(ids))
            assert sides["full"][1] == sides["probed"][1], "the allowed sets differ"
            kind = "punctuation" if sides["probed"][2] < model.n_vocab // 2 else "string"
            steps[kind].append((sides["full"][0], sides["probed"][0]))
            lib.llama_sampler_accept(sampler._grammar, token)
            sampler._utf8.feed(vocab.piece(token))
        print(f"{path}: {model.n_vocab} tokens, control tokens and index read in {build * 1000:.0f} ms")
        for kind, times in steps.items():
            if times:
                full = statistics.median(a for a, _ in times) * 1000
                probed = statistics.median(b for _, b in times) * 1000
                print(f"  {kind:11s} {len(times):2d} steps: whole vocabulary {full:5.1f} ms, "
                      f"with probes {probed:5.1f} ms ({full / probed:.1f}x)")
    finally:
        sampler.close()
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="GGUF file (repeatable; default: "
                        "the embedded Gemma 3 270M)")
    args = parser.parse_args()
    for path in args.model or [str(default_model_path())]:
        measure(path)


if __name__ == "__main__":
    main()
