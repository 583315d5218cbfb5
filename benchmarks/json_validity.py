"""JSON-schema answers: how many parse and validate, over bounded schemas and fixed seeds.

Ten bounded schemas (``maxLength``, ``maxItems``, enums: every answer has a token bound that
fits ``max_tokens``, so no answer is cut) times ``--seeds`` seeds at temperature 1, on the
tiny gpt-oss fixture (random weights: free analysis, then the constrained final channel) and
on the default model (Gemma 3 270M: the grammar from the first token). Answers are checked
with ``jsonschema`` (Draft 2020-12), independently of the grammar that produced them; an
answer cut by ``max_tokens`` counts as invalid.

    python benchmarks/json_validity.py [--seeds 20] [--models tiny,default] [--max-tokens 256]
                                       [--threads N]

Prints the counts per schema and model; exits 1 unless every answer is valid.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jsonschema  # noqa: E402

from benchmarks._validity import format_checker, tiny_model  # noqa: E402
from ggufllm import LLMService  # noqa: E402
from ggufllm.resolve import default_model_path  # noqa: E402

S = {"type": "string"}
SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "city": ("Which city is the capital of France?", {"type": "object", "properties": {
        "name": {**S, "maxLength": 20}, "country": {"enum": ["FR", "DE", "IT", "other"]}},
        "required": ["name", "country"]}),
    "sentiment": ("Is 'I love it' positive?", {"type": "object", "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]}, "confident": {"type": "boolean"}},
        "required": ["label", "confident"]}),
    "tags": ("Tag this text: cats and dogs.", {"type": "object", "properties": {
        "tags": {"type": "array", "items": {**S, "maxLength": 10}, "minItems": 1,
                 "maxItems": 4}}, "required": ["tags"]}),
    "person": ("Who wrote Hamlet?", {"type": "object", "properties": {
        "first": {**S, "maxLength": 16}, "last": {**S, "maxLength": 16},
        "born": {"type": "integer"}}, "required": ["first", "last"]}),
    "answer_with_citations": ("Answer from the passages [1] and [2].", {
        "type": "object", "properties": {"answer": {**S, "maxLength": 60},
                                         "citations": {"type": "array", "items": {"enum": [1, 2, 3]},
                                                       "maxItems": 3}},
        "required": ["answer", "citations"]}),
    "event": ("When is the meeting?", {"type": "object", "properties": {
        "title": {**S, "maxLength": 20}, "date": {**S, "format": "date"},
        "time": {**S, "format": "time"}}, "required": ["title", "date"]}),
    "nullable": ("Any middle name?", {"type": "object", "properties": {
        "middle": {"anyOf": [{**S, "maxLength": 12}, {"type": "null"}]}},
        "required": ["middle"]}),
    "nested": ("Describe a trip.", {"type": "object", "properties": {
        "city": {"type": "object", "properties": {"name": {**S, "maxLength": 16},
                                                  "days": {"enum": [1, 2, 3]}},
                 "required": ["name", "days"]},
        "budget": {"enum": ["low", "mid", "high"]}}, "required": ["city", "budget"]}),
    "refs": ("List two items.", {"type": "object", "$defs": {"Item": {
        "type": "object", "properties": {"id": {"type": "integer"}, "label": {**S, "maxLength": 8}},
        "required": ["id", "label"]}}, "properties": {
        "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 2}},
        "required": ["items"]}),
    "tuple": ("Give a point.", {"type": "object", "properties": {
        "point": {"type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}]},
        "uuid": {**S, "format": "uuid"}}, "required": ["point"]}),
}


def run(model: Path | str, seeds: int, max_tokens: int, reasoning_budget: int | None,
        threads: dict[str, int]) -> dict[str, Counter[str]]:
    per: dict[str, Counter[str]] = {name: Counter() for name in SCHEMAS}
    with LLMService(model, max_length=2048, **threads) as svc:
        for name, (question, schema) in SCHEMAS.items():
            check = jsonschema.Draft202012Validator(schema,
                                                    format_checker=format_checker())
            for seed in range(seeds):
                answer = svc.answer(question, response_format=schema, seed=seed,
                                    temperature=1.0, max_tokens=max_tokens,
                                    reasoning_budget=reasoning_budget)
                if answer.finish_reason != "stop":
                    per[name][f"finish={answer.finish_reason}"] += 1
                    continue
                try:
                    check.validate(json.loads(answer.text))
                except (ValueError, jsonschema.ValidationError) as exc:
                    per[name][f"invalid: {str(exc).splitlines()[0][:60]}"] += 1
                    continue
                per[name]["ok"] += 1
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20, help="answers per schema and model")
    ap.add_argument("--models", default="tiny,default")
    ap.add_argument("--threads", type=int, default=None,
                    help="llama.cpp threads (default: N_THREADS, else llama.cpp's)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--reasoning-budget", type=int, default=8,
                    help="gpt-oss analysis tokens before the answer is forced")
    args = ap.parse_args()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for which in args.models.split(","):
            model = tiny_model(Path(tmp)) if which == "tiny" else default_model_path()
            t0 = time.perf_counter()
            per = run(model, args.seeds, args.max_tokens,
                      args.reasoning_budget if which == "tiny" else None,
                      {"n_threads": args.threads} if args.threads else {})
            total = sum(sum(c.values()) for c in per.values())
            valid = sum(c["ok"] for c in per.values())
            failed |= valid != total
            print(f"\n## {which}: {valid}/{total} valid ({100 * valid / max(total, 1):.1f}%), "
                  f"temperature 1, max_tokens {args.max_tokens}, "
                  f"{time.perf_counter() - t0:.0f} s")
            print("| schema | answers | valid | other outcomes |")
            print("| --- | --- | --- | --- |")
            for name, counts in per.items():
                other = ", ".join(f"{k}: {v}" for k, v in counts.items() if k != "ok")
                print(f"| {name} | {sum(counts.values())} | {counts['ok']} | {other or '-'} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
