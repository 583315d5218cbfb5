"""Does a prefix kept in an idle slot slow the one running request down?

ggufllm's KV cache is one unified pool: every slot keeps its last prompt for reuse, and
llama.cpp's attention spans the pool's used cells. This measures one greedy stream of
``--tokens`` tokens (decode rate after the first token) on a cache emptied first, against
the same after ``--slots - 1`` other requests left their prefixes in the other slots;
rounds alternate the two, and the medians are printed.

    python benchmarks/idle_slots.py [--slots 8] [--tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from ggufllm import LLMService
from ggufllm.resolve import default_model_path

TOPICS = ["dragons", "the sea", "volcanoes", "bread", "trains", "owls", "glaciers", "chess",
          "copper", "tides", "bees", "maps", "clocks", "salt", "kites", "moss", "rivers"]


def decode_rate(svc: LLMService, topic: str, n_tokens: int) -> float:
    """Tokens/s of one greedy stream, from its first token to its last."""
    t0, n = 0.0, 0
    for chunk in svc.complete_stream(f"Tell me about {topic}.", temperature=0.0,
                                     max_tokens=n_tokens):
        if chunk.token_ids:
            if not t0:
                t0 = time.perf_counter()
            else:
                n += len(chunk.token_ids)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    rates: dict[str, list[float]] = {"empty cache": [], "idle slots full": []}
    topics = iter(TOPICS * (args.rounds * (args.slots + 1)))
    with LLMService(default_model_path(), max_length=1024, n_parallel=args.slots) as svc:
        for _ in range(args.rounds):
            svc.clear_kv_cache()
            rates["empty cache"].append(decode_rate(svc, next(topics), args.tokens))
            svc.clear_kv_cache()
            for _ in range(args.slots - 1):
                decode_rate(svc, next(topics), args.tokens)
            in_use = svc.get_model_info()["kv_cache"]["tokens_in_use"]
            rates["idle slots full"].append(decode_rate(svc, next(topics), args.tokens))
    for name, values in rates.items():
        print(f"{name:>16}: median {statistics.median(values):5.1f} tok/s  "
              f"(rounds {', '.join(f'{v:.1f}' for v in values)})")
    print(f"cells in use with the idle slots full (before the measured request): {in_use}")


if __name__ == "__main__":
    main()
