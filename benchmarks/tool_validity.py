"""Forced tool calls on the tiny gpt-oss fixture: how many carry schema-valid arguments.

The fixture has random weights, the hard case: whatever it wants to write, a forced call must
name the function asked for (or, with ``required``, one of those offered) and its arguments
must validate against that function's schema. Five functions are offered on every request;
each sample forces one of them by name (``--samples`` in all, fixed seeds 0.., temperature 1),
then ``--required`` more samples use ``tool_choice="required"``. Arguments are checked with
``jsonschema`` (Draft 2020-12), independently of the grammar that produced them.

    python benchmarks/tool_validity.py [--samples 200] [--required 50] [--max-tokens 160]
                                       [--reasoning-budget 8] [--threads N]

Prints the counts per function and the totals; exits 1 unless every call is valid.
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
from ggufllm import LLMService, Turn  # noqa: E402

FUNCTIONS: dict[str, dict[str, Any]] = {
    "get_weather": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]},
    "search_docs": {"type": "object", "properties": {
        "query": {"type": "string", "maxLength": 40},
        "top_k": {"type": "integer"},
        "filters": {"type": "array", "items": {"type": "string", "maxLength": 12},
                    "maxItems": 3}}, "required": ["query"]},
    "add_event": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 20},
        "date": {"type": "string", "format": "date"},
        "attendees": {"type": "array", "items": {"type": "string", "maxLength": 16},
                      "minItems": 1, "maxItems": 3},
        "urgent": {"type": "boolean"}}, "required": ["title", "date", "attendees", "urgent"]},
    "convert_units": {"type": "object", "properties": {
        "value": {"type": "number"},
        "from_unit": {"enum": ["m", "km", "mi", "ft"]},
        "to_unit": {"enum": ["m", "km", "mi", "ft"]}},
        "required": ["value", "from_unit", "to_unit"]},
    "create_ticket": {"type": "object", "properties": {
        "summary": {"type": "string", "maxLength": 30},
        "priority": {"enum": ["low", "medium", "high"]},
        "owner": {"anyOf": [{"type": "string", "maxLength": 16}, {"type": "null"}]},
        "labels": {"type": "array", "items": {"enum": ["bug", "ui", "api"]}, "maxItems": 3},
        "meta": {"type": "object", "properties": {"source": {"enum": ["web", "mail"]},
                                                  "count": {"type": "integer"}},
                 "required": ["source"]}},
        "required": ["summary", "priority", "meta"]},
}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} (benchmark)",
                                           "parameters": schema}}
         for name, schema in FUNCTIONS.items()]
QUESTION = [Turn("user", "Use a tool for this: weather in Paris, then plan the week.")]


def check(svc: LLMService, choice: Any, seed: int, max_tokens: int, want: str | None,
          reasoning_budget: int | None) -> tuple[str, str | None]:
    """One forced call: ``ok`` or why not, and the function called."""
    answer = svc.chat(QUESTION, tools=TOOLS, tool_choice=choice, seed=seed, temperature=1.0,
                      max_tokens=max_tokens, reasoning_budget=reasoning_budget)
    if answer.finish_reason != "tool_call" or len(answer.tool_calls) != 1:
        return f"finish={answer.finish_reason} calls={len(answer.tool_calls)}", None
    call = answer.tool_calls[0]
    if call.name not in FUNCTIONS or (want is not None and call.name != want):
        return f"wrong function {call.name!r}", call.name
    try:
        jsonschema.Draft202012Validator(
            FUNCTIONS[call.name], format_checker=format_checker()).validate(
            json.loads(call.arguments))
    except (ValueError, jsonschema.ValidationError) as exc:
        return f"invalid: {str(exc).splitlines()[0]}", call.name
    if answer.text:
        return "answer text beside the call", call.name
    return "ok", call.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200, help="calls forced by name")
    ap.add_argument("--required", type=int, default=50, help="calls with tool_choice=required")
    ap.add_argument("--threads", type=int, default=None,
                    help="llama.cpp threads (default: N_THREADS, else llama.cpp's)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--reasoning-budget", type=int, default=8, help="analysis tokens before "
                    "the call is forced (the fixture would reason until max_tokens; what is "
                    "measured is the call)")
    ap.add_argument("--model", default=None, help="a gpt-oss GGUF (default: the tiny fixture)")
    args = ap.parse_args()
    threads = {"n_threads": args.threads} if args.threads else {}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        with LLMService(model, max_length=2048, **threads) as svc:
            names = list(FUNCTIONS)
            per: dict[str, Counter[str]] = {n: Counter() for n in names + ["(required)"]}
            t0 = time.perf_counter()
            for seed in range(args.samples):
                name = names[seed % len(names)]
                verdict, _ = check(svc, name, seed, args.max_tokens, name,
                                   args.reasoning_budget)
                per[name][verdict] += 1
            for seed in range(args.required):
                verdict, called = check(svc, "required", 10_000 + seed, args.max_tokens, None,
                                        args.reasoning_budget)
                per["(required)"][verdict] += 1
                if called:
                    per["(required)"][f"called {called}"] += 1
            elapsed = time.perf_counter() - t0
    total = args.samples + args.required
    valid = sum(c["ok"] for c in per.values())
    print(f"model: {'tiny gpt-oss fixture (random weights)' if not args.model else args.model}")
    print(f"temperature 1, max_tokens {args.max_tokens}, reasoning budget "
          f"{args.reasoning_budget}, seeds fixed; {elapsed:.0f} s")
    print("| tool_choice | samples | schema-valid | other outcomes |")
    print("| --- | --- | --- | --- |")
    for name, counts in per.items():
        n = sum(v for k, v in counts.items() if not k.startswith("called "))
        other = ", ".join(f"{k}: {v}" for k, v in counts.items() if k != "ok")
        print(f"| {name} | {n} | {counts['ok']} | {other or '-'} |")
    print(f"\nschema-valid forced calls: {valid}/{total} ({100 * valid / max(total, 1):.1f}%)")
    sys.exit(0 if valid == total else 1)


if __name__ == "__main__":
    main()
