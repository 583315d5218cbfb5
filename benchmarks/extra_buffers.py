"""llama.cpp's extra CPU buffer types (repacked layouts, AMX) on and off, and the self-test's cost.

A bare llama.cpp loop (no ggufllm in the timed path) loads the model with
``use_extra_bufts`` on, then off, in alternating rounds, and measures prompt
evaluation (one batch of ``--prompt`` tokens) and greedy decoding (``--tokens``
tokens). Then the CPU kernel self-test runs cold (a fresh cache folder each time)
to report what a first load pays for it.

    python benchmarks/extra_buffers.py [--model PATH] [--rounds 5] [--prompt 512] [--tokens 128]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

import llama_cpp.llama_cpp as lib

from ggufllm.gguf_file import read_gguf_header
from ggufllm.native.kernels import run_self_test
from ggufllm.native.runtime import default_threads, ensure_backend
from ggufllm.resolve import default_model_path


def speeds(path: str, extra: bool, n_prompt: int, n_tokens: int) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) of one load with ``use_extra_bufts = extra``."""
    mparams = lib.llama_model_default_params()
    mparams.use_extra_bufts = extra
    model = lib.llama_model_load_from_file(path.encode(), mparams)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = n_prompt + n_tokens + 16
    cparams.n_batch = cparams.n_ubatch = n_prompt
    cparams.n_threads = cparams.n_threads_batch = default_threads()
    cparams.no_perf = True
    ctx = lib.llama_init_from_model(model, cparams)
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    prompt = (lib.llama_token * n_prompt)(*[(31 * i + 7) % n_vocab for i in range(n_prompt)])
    start = time.perf_counter()
    lib.llama_decode(ctx, lib.llama_batch_get_one(prompt, n_prompt))
    prompt_tps = n_prompt / (time.perf_counter() - start)
    sampler = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(sampler, lib.llama_sampler_init_greedy())
    one = (lib.llama_token * 1)()
    start = time.perf_counter()
    for _ in range(n_tokens):
        one[0] = lib.llama_sampler_sample(sampler, ctx, -1)
        lib.llama_decode(ctx, lib.llama_batch_get_one(one, 1))
    decode_tps = n_tokens / (time.perf_counter() - start)
    lib.llama_sampler_free(sampler)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
    return prompt_tps, decode_tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--self-tests", type=int, default=3)
    args = ap.parse_args()
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    ensure_backend()
    path = args.model or str(default_model_path())
    summary = read_gguf_header(path, probe=False)
    verdict = run_self_test(summary, default_threads())
    print(f"model {path}, {default_threads()} threads; self-test here: {verdict['status']} "
          f"{verdict['reason']}")
    if verdict["status"] != "passed":
        print("the extra buffers fail on this CPU: measuring 'off' only")
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for extra in order:
            if extra and verdict["status"] != "passed":
                continue
            runs[extra].append(speeds(path, extra, args.prompt, args.tokens))
        line = "   ".join(f"{'on ' if e else 'off'}: prompt {runs[e][-1][0]:7.1f} tok/s, decode "
                           f"{runs[e][-1][1]:6.2f} tok/s" for e in (True, False) if runs[e])
        print(f"round {r + 1}: {line}")
    for extra in (True, False):
        if runs[extra]:
            p = statistics.median(x[0] for x in runs[extra])
            d = statistics.median(x[1] for x in runs[extra])
            print(f"median, extra buffers {'on ' if extra else 'off'}: prompt {p:.1f} tok/s, "
                  f"decode {d:.2f} tok/s")
    if runs[True] and runs[False]:
        rp = statistics.median(a[0] / b[0] for a, b in zip(runs[True], runs[False], strict=True))
        rd = statistics.median(a[1] / b[1] for a, b in zip(runs[True], runs[False], strict=True))
        print(f"on / off, median of per-round ratios: prompt {rp:.2f}x, decode {rd:.2f}x")
    costs = []
    for _ in range(args.self_tests):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["XDG_CACHE_HOME"] = cache
            costs.append(float(run_self_test(summary, default_threads())["seconds"]))
    print(f"self-test cost, cold (child start, tiny model, decode): median "
          f"{statistics.median(costs):.2f} s of {len(costs)} ({', '.join(f'{c:.2f}' for c in costs)})")


if __name__ == "__main__":
    main()
