"""Decode speed of ggufllm's streaming against a bare llama-cpp-python loop.

Both run in this process on the same model file with the same context
settings, greedy sampling and the same prompt tokens; rounds alternate so that
drift on a shared machine hits both alike. Prints tokens/s of each and the
ratio ggufllm / bare (the target is >= 0.97).

    python benchmarks/decode_speed.py [--model PATH] [--tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import llama_cpp.llama_cpp as lib

from ggufllm import LLMService, Turn
from ggufllm.native.runtime import default_threads
from ggufllm.resolve import default_model_path

PROMPT = "Write a long story about a dragon who learns to fly."


def bare_loop(model_path: str, prompt: list[int], n_tokens: int, n_ctx: int,
              extra_buffers: bool = True) -> float:
    """The reference: llama.cpp's C API driven directly, no wrapper. Returns tokens/s.

    ``extra_buffers`` is llama.cpp's ``use_extra_bufts`` (its default: on); the benchmark
    passes what ggufllm's CPU kernel self-test decided, so both load alike.
    """
    mparams = lib.llama_model_default_params()
    mparams.use_extra_bufts = extra_buffers
    model = lib.llama_model_load_from_file(model_path.encode(), mparams)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch = n_ctx, 512
    cparams.n_ubatch = 512
    cparams.n_threads = cparams.n_threads_batch = default_threads()
    cparams.no_perf = True
    ctx = lib.llama_init_from_model(model, cparams)
    sampler = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(sampler, lib.llama_sampler_init_greedy())
    arr = (lib.llama_token * len(prompt))(*prompt)
    lib.llama_decode(ctx, lib.llama_batch_get_one(arr, len(prompt)))
    one = (lib.llama_token * 1)()
    start = time.perf_counter()
    for _ in range(n_tokens):
        one[0] = lib.llama_sampler_sample(sampler, ctx, -1)
        lib.llama_decode(ctx, lib.llama_batch_get_one(one, 1))
    elapsed = time.perf_counter() - start
    lib.llama_sampler_free(sampler)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
    return n_tokens / elapsed


def ggufllm_stream(service: LLMService, n_tokens: int) -> tuple[float, int]:
    """ggufllm's public streaming call; returns (tokens/s, tokens generated)."""
    service.clear_gpu_cache()
    timings = None
    for chunk in service.stream(PROMPT, temperature=0.0, max_tokens=n_tokens, stop=()):
        timings = chunk.timings or timings
    assert timings is not None
    # like the bare loop, count from the first sampled token to the last, as the scheduler
    # thread saw them (the consumer thread may read them later, in bunches)
    n = timings.n_generated
    return (n - 1) / timings.decode_s, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ctx", type=int, default=1024)
    args = ap.parse_args()
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    path = args.model or str(default_model_path())
    service = LLMService(path, max_length=args.ctx)
    service.load()
    # the exact tokens ggufllm evaluates for PROMPT
    prompt = service._engine.prompts.build([Turn("user", PROMPT)], service.generation_config).tokens
    kernels = service.get_model_info()["cpu_extra_buffers"]
    extra = bool(kernels["use_extra_buffers"])
    print(f"CPU kernel self-test: {kernels['status']}; extra buffers "
          f"{'on' if extra else 'off'} for both")
    ours, bare = [], []
    for r in range(args.rounds):
        # alternate which one runs first, so that drift does not favour either
        if r % 2 == 0:
            tps, n = ggufllm_stream(service, args.tokens)
            ours.append(tps)
            bare.append(bare_loop(path, prompt, n - 1, args.ctx, extra))
        else:
            bare.append(bare_loop(path, prompt, args.tokens - 1, args.ctx, extra))
            tps, n = ggufllm_stream(service, args.tokens)
            ours.append(tps)
        print(f"round {r + 1}: ggufllm {ours[-1]:6.2f} tok/s   bare {bare[-1]:6.2f} tok/s   "
              f"ratio {ours[-1] / bare[-1]:.3f}")
    o, b = statistics.median(ours), statistics.median(bare)
    paired = statistics.median(x / y for x, y in zip(ours, bare, strict=True))
    print(f"model {path}\nthreads {default_threads()}, {args.tokens} tokens, {args.rounds} rounds")
    print(f"median: ggufllm {o:.2f} tok/s, bare llama.cpp loop {b:.2f} tok/s; "
          f"median of the per-round ratios {paired:.3f}")
    service.close()


if __name__ == "__main__":
    main()
