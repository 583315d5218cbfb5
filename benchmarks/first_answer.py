"""How often the first `ggufllm ask` answers right, at the shipped default settings.

Runs what `ggufllm ask "What is the capital of France?"` runs (the default model,
the default sampling settings, a random seed each time) N times through the
library and counts the answers that contain the expected word; then the same for
a handful of other factual questions. The target is "Paris" in at least 19 of 20.

    python benchmarks/first_answer.py [--runs 20] [--model PATH] [--no-frame]

``--no-frame`` removes the worked question/answer pairs from the completion
prompt of a base model, to compare with the bare ``Question: ... Answer:`` frame.
"""

from __future__ import annotations

import argparse
import logging
import time

from ggufllm import LLMService
from ggufllm.engine import prompt as prompt_module

FIRST = ("What is the capital of France?", ("Paris",))
OTHERS = [
    ("What is the capital of Japan?", ("Tokyo",)),
    ("Who wrote Hamlet?", ("Shakespeare",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "Vinci")),
    ("What is the capital of Italy?", ("Rome",)),
]


def score(service: LLMService, question: str, expected: tuple[str, ...], runs: int) -> int:
    """Asks ``question`` ``runs`` times; prints each wrong answer; returns the right ones."""
    right = 0
    for _ in range(runs):
        text = service.answer(question).text
        if any(word in text for word in expected):
            right += 1
        else:
            print(f"    wrong: {text.strip()[:70]!r}")
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="answers per question (default 20)")
    parser.add_argument("--others", type=int, default=None,
                        help="answers per other question (default: --runs)")
    parser.add_argument("--model", default=None, help="a .gguf (default: what `ggufllm ask` uses)")
    parser.add_argument("--no-frame", action="store_true",
                        help="measure the bare completion prompt, without the worked examples")
    args = parser.parse_args()
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    if args.no_frame:
        prompt_module._COMPLETION_FRAME = ""  # type: ignore[attr-defined]
    with LLMService(args.model) as service:
        info = service.get_model_info()
        cfg = service.generation_config
        print(f"model {info['model_path']} ({info['prompt_format']} prompts"
              f"{', no frame' if args.no_frame else ''})")
        print(f"defaults: temperature {cfg.temperature}, top_p {cfg.top_p}, top_k {cfg.top_k}, "
              f"seed random")
        t0 = time.perf_counter()
        question, expected = FIRST
        right = score(service, question, expected, args.runs)
        print(f"{question!r}: {expected[0]} in {right}/{args.runs}")
        for question, expected in OTHERS:
            runs = args.others or args.runs
            print(f"{question!r}: {expected[0]} in {score(service, question, expected, runs)}/{runs}")
        print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
