"""Aggregate decode throughput of concurrent requests, against one-at-a-time and a bare batched loop.

For each concurrency C: C greedy requests submitted together through
``LLMService.stream`` (one thread each), the same C requests one after the
other, and a bare llama.cpp loop (C sequences, each prompt in its own batch,
then one ``llama_decode`` per step carrying one token per sequence). All three
run in this process on the same model and prompts; prints generated tokens/s
of each and the ratios (targets: >= 0.9x the bare loop; >= 1.9x one request's
rate at 8 on Gemma 270M with 2 threads).

    python benchmarks/concurrency.py [--model PATH] [--levels 1,2,4,8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from batch_invariance import Bare, prompt_items  # noqa: E402

from ggufllm import LLMService, Turn  # noqa: E402
from ggufllm.resolve import default_model_path  # noqa: E402

# Prompts whose greedy answers on the embedded model run past 64 tokens (lists): the bare loop
# always decodes --tokens tokens, so ours must too for the rates to compare.
PROMPTS = ["List the first fifty prime numbers.", "List the first fifty odd numbers.",
           "List the multiples of seven up to seven hundred.", "List the first fifty Fibonacci numbers.",
           "List the first hundred multiples of three.", "List the first hundred multiples of five.",
           "List the first hundred multiples of four.", "List the multiples of eight up to eight hundred."]


def prompt_text(i: int) -> str:
    return PROMPTS[i % len(PROMPTS)]


def run_ours(svc: LLMService, n: int, tokens: int, together: bool) -> tuple[int, float]:
    """(tokens generated, seconds) for ``n`` requests, together or one at a time."""
    counts = [0] * n

    def one(i: int) -> None:
        for chunk in svc.stream(prompt_text(i), temperature=0.0, max_tokens=tokens, stop=()):
            counts[i] += len(chunk.token_ids)

    svc.clear_kv_cache()
    start = time.perf_counter()
    if together:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(n):
            one(i)
    elapsed = time.perf_counter() - start
    if sum(counts) < n * tokens:
        print(f"  note: {n * tokens - sum(counts)} of {n * tokens} tokens not generated "
              "(an answer ended early); rates compare less well")
    return sum(counts), elapsed


def run_bare(bare: Bare, prompts: list[list[int]], tokens: int) -> tuple[int, float]:
    """The reference: C sequences, prompts apart, then batched greedy decode steps."""
    import llama_cpp.llama_cpp as lib

    lib.llama_memory_clear(bare.mem, True)
    start = time.perf_counter()
    last = {}
    for s, toks in enumerate(prompts):
        bare.decode(prompt_items(toks, s))
        last[s] = int(np.argmax(bare.logits(len(toks) - 1)))
    pos = {s: len(toks) for s, toks in enumerate(prompts)}
    generated = len(prompts)
    for _ in range(tokens - 1):
        bare.decode([(last[s], pos[s], s, True) for s in last])
        for i, s in enumerate(list(last)):
            last[s] = int(lib.llama_sampler_sample(bare.greedy, bare.ctx, i))
            pos[s] += 1
        generated += len(last)
    return generated, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=512, help="MAX_LENGTH of one request")
    args = ap.parse_args()
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    levels = [int(x) for x in args.levels.split(",")]
    path = args.model or str(default_model_path())
    svc = LLMService(path, max_length=args.ctx, n_parallel=max(levels), max_queue=64)
    svc.load()
    prompts = [svc._engine.build([Turn("user", prompt_text(i))], svc.generation_config).tokens
               for i in range(max(levels))]
    bare = Bare(path, max(levels), args.ctx * max(levels))
    import llama_cpp.llama_cpp as lib

    bare.greedy = lib.llama_sampler_init_greedy()
    print(f"model {path}, {args.tokens} tokens per request, greedy")
    print(f"{'C':>3} {'together':>10} {'one by one':>11} {'bare loop':>10} "
          f"{'vs bare':>8} {'vs 1-by-1':>9}")
    for c in levels:
        n_t, s_t = run_ours(svc, c, args.tokens, together=True)
        n_s, s_s = run_ours(svc, c, args.tokens, together=False)
        n_b, s_b = run_bare(bare, prompts[:c], args.tokens)
        ours, seq, ref = n_t / s_t, n_s / s_s, n_b / s_b
        print(f"{c:>3} {ours:>8.1f}/s {seq:>9.1f}/s {ref:>8.1f}/s {ours / ref:>8.2f} "
              f"{ours / seq:>9.2f}")
    lib.llama_sampler_free(bare.greedy)
    bare.close()
    svc.close()


if __name__ == "__main__":
    main()
