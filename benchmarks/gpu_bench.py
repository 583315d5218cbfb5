"""Measurements of benchmarks/gpu_check.sh: load, prefill and decode speed, memory vs estimate.

Each placement (everything offloaded; all experts on the CPU) is measured twice:
through the bare llama.cpp C API (llama-cpp-python's ctypes functions, our
``tensor_buft_overrides`` array) and through ggufllm's ``LLMService``. On a CPU build
(``--gpu`` not given) both placements keep every layer on the CPU: the script's
plumbing is what is checked there, not speed.

    python benchmarks/gpu_check.py bench --model MODEL.gguf [--gpu] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import llama_cpp.llama_cpp as lib

from ggufllm import LLMService
from ggufllm.gpu.devices import gpu_devices
from ggufllm.gpu.estimate import estimate_memory
from ggufllm.gpu.placement import TensorOverrides, observe_load
from ggufllm.native.kernels import extra_buffers_for
from ggufllm.native.runtime import default_threads, ensure_backend

MiB = 2**20
N_CTX = 4096
PROMPT_TOKENS = 512
PLACEMENTS = {"all_on_gpu": dict(cpu_moe=False), "experts_on_cpu": dict(cpu_moe=True)}


def _gpu_free() -> int | None:
    gpus = gpu_devices()
    return gpus[0].free_bytes if gpus else None


def _timed_decode(ctx: Any, tokens: list[int]) -> float:
    arr = (lib.llama_token * len(tokens))(*tokens)
    t = time.perf_counter()
    rc = lib.llama_decode(ctx, lib.llama_batch_get_one(arr, len(tokens)))
    lib.llama_synchronize(ctx)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    return time.perf_counter() - t


def bare(model_path: str, n_gpu_layers: int, cpu_moe: bool, n_decode: int) -> dict[str, Any]:
    """Load, prefill and decode through the C API; GPU memory from ggml's device memory."""
    ensure_backend()
    free_before = _gpu_free()
    params = lib.llama_model_default_params()
    params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers < 0 else n_gpu_layers
    # the kernels the engine runs: extra buffers only where ggufllm's self-test passed
    params.use_extra_bufts = extra_buffers_for(model_path)
    overrides = TensorOverrides.for_experts(cpu_moe, 0)
    if overrides is not None:
        params.tensor_buft_overrides = overrides.address
    t = time.perf_counter()
    with observe_load() as report:
        model = lib.llama_model_load_from_file(model_path.encode(), params)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = N_CTX, PROMPT_TOKENS, PROMPT_TOKENS
        cparams.n_threads = cparams.n_threads_batch = default_threads()
        cparams.no_perf = True
        ctx = lib.llama_init_from_model(model, cparams)
    load_s = time.perf_counter() - t
    free_after = _gpu_free()
    try:
        vocab = lib.llama_n_vocab(lib.llama_model_get_vocab(model))
        prompt = [(i * 7919) % 100_000 + 1000 for i in range(PROMPT_TOKENS)]
        _timed_decode(ctx, prompt[:32])  # warm-up (kernels, graph), then an empty cache
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        prefill_s = _timed_decode(ctx, prompt)
        decode_s = sum(_timed_decode(ctx, [(i * 131) % vocab]) for i in range(n_decode))
    finally:
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    used = (free_before - free_after) if free_before is not None and free_after is not None else 0
    return {"load_s": round(load_s, 2), "prefill_tok_s": round(PROMPT_TOKENS / prefill_s, 1),
            "decode_tok_s": round(n_decode / decode_s, 1),
            "gpu_used_mib": round(used / MiB), "gpu_reported_mib": report.device_mib(),
            "host_reported_mib": report.host_mib(), "expert_tensors_on_cpu": len(report.overrides)}


def through_ggufllm(model_path: str, n_gpu_layers: int | str, cpu_moe: bool,
                    n_decode: int) -> dict[str, Any]:
    """Load and generate through LLMService (greedy, one request)."""
    t = time.perf_counter()
    svc = LLMService(model_path, max_length=N_CTX, n_parallel=1, n_gpu_layers=n_gpu_layers,
                     cpu_moe=cpu_moe)
    svc.load()
    load_s = time.perf_counter() - t
    try:
        info = svc.get_model_info()
        question = " ".join(["the rain in the north"] * 18)  # ~512 tokens on the synthetic vocabulary
        t = time.perf_counter()
        first = None
        n = 0
        for chunk in svc.stream(question, max_tokens=n_decode, temperature=0.0):
            if first is None and chunk.token_ids:
                first = time.perf_counter()
            n += len(chunk.token_ids)
        end = time.perf_counter()
    finally:
        svc.close()
    first = first or end
    return {"load_s": round(load_s, 2), "first_token_s": round(first - t, 3),
            "decode_tok_s": round(max(n - 1, 1) / max(end - first, 1e-9), 1),
            "tokens": n, "n_gpu_layers": info.get("n_gpu_layers"),
            "expert_tensors_on_cpu": info.get("expert_tensors_on_cpu"),
            "gpu_reported_mib": info.get("gpu_memory_used_mib")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpu", action="store_true", help="offload (needs a GPU build and device)")
    ap.add_argument("--decode", type=int, default=64, help="tokens to decode")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    ensure_backend()
    if args.gpu and not gpu_devices():
        print("error: --gpu, but llama.cpp sees no GPU (CPU build or no device)")
        return 1
    layers = -1 if args.gpu else 0
    gpus = gpu_devices()
    results: dict[str, Any] = {"device": gpus[0].description if gpus else "CPU only",
                               "model": args.model, "n_ctx": N_CTX}
    for name, how in PLACEMENTS.items():
        est = estimate_memory(args.model, n_ctx=N_CTX, n_gpu_layers=layers, **how)
        row = {"estimate_gpu_mib": round(est.device_total / MiB),
               "estimate_host_mib": round(est.host_total / MiB),
               "bare": bare(args.model, layers, how["cpu_moe"], args.decode),
               "ggufllm": through_ggufllm(args.model, layers, how["cpu_moe"], args.decode)}
        results[name] = row
        b, g = row["bare"], row["ggufllm"]
        print(f"{name:>15}: load {b['load_s']} s (ggufllm {g['load_s']} s), prefill "
              f"{b['prefill_tok_s']} tok/s, decode {b['decode_tok_s']} tok/s (ggufllm "
              f"{g['decode_tok_s']} tok/s, first token {g['first_token_s']} s); GPU used "
              f"{b['gpu_used_mib']} MiB (llama.cpp buffers {b['gpu_reported_mib']} MiB, estimate "
              f"{row['estimate_gpu_mib']} MiB); experts on CPU: {b['expert_tensors_on_cpu']}",
              flush=True)
    auto = LLMService(args.model, max_length=N_CTX, n_parallel=1)
    from ggufllm.gpu.placement import placement_for_settings

    results["auto"] = placement_for_settings(auto.settings, args.model).as_dict()
    print(f"auto placement: {results['auto']['reason']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
