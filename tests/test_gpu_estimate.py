"""estimate_memory against what llama.cpp reports allocating on the CPU build.

llama.cpp logs each buffer it allocates at load ("model buffer size", "KV buffer size",
"compute buffer size"); :func:`observe_load` reads them from the ``ggufllm.llama_cpp``
logger. Each estimate must be within 10% of them, for the default model (Gemma 3,
sliding-window layers 5 of 6) and the tiny gpt-oss fixture (MoE, MXFP4 experts).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import llama_cpp.llama_cpp as lib
import pytest

from ggufllm.engine.native import NativeModel
from ggufllm.gguf_file import read_gguf_header
from ggufllm.gpu.estimate import estimate_memory, is_expert
from ggufllm.gpu.placement import LoadReport, observe_load

TOLERANCE = 0.10
KV_TYPES = {"f16": 1, "q8_0": 8}  # ggml_type ids


def load_model(path: Path, n_cpu_moe: int = 0) -> tuple[NativeModel, LoadReport]:
    """Loads the model on the CPU; returns it and what llama.cpp logged (its weights)."""
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    with observe_load() as report:
        model = NativeModel(str(path), n_gpu_layers=0, n_cpu_moe=n_cpu_moe)
    return model, report


def context_report(model: NativeModel, *, n_ctx: int, n_parallel: int, kv_cache_type: str,
                   swa_full: bool, n_ubatch: int, kv_unified: bool = True) -> LoadReport:
    """Creates a context on ``model`` as configured; returns what llama.cpp logged (its KV
    cache and compute buffers)."""
    with observe_load() as report:
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx * n_parallel
        params.n_seq_max = n_parallel
        params.kv_unified = kv_unified
        params.n_batch = params.n_ubatch = n_ubatch
        params.swa_full = swa_full
        params.type_k = params.type_v = KV_TYPES[kv_cache_type]
        params.n_threads = params.n_threads_batch = 1
        ctx = lib.llama_init_from_model(model.ptr, params)
        assert ctx
    lib.llama_free(ctx)
    return report


# One load per model for the module: the weights do not depend on the context's settings,
# and each configuration's KV cache and compute buffers come from a context of its own.
@pytest.fixture(scope="module")
def default_model(default_gguf) -> Iterator[tuple[NativeModel, LoadReport]]:
    model, report = load_model(default_gguf)
    yield model, report
    model.close()


@pytest.fixture(scope="module")
def tiny_model(tiny_gguf) -> Iterator[tuple[NativeModel, LoadReport]]:
    model, report = load_model(tiny_gguf("q8_0"), n_cpu_moe=1)
    yield model, report
    model.close()


def assert_close(estimated: int, reported_mib: float, what: str) -> None:
    mib = estimated / 2**20
    assert reported_mib > 0, what
    assert abs(mib - reported_mib) <= TOLERANCE * reported_mib, \
        f"{what}: estimated {mib:.2f} MiB, llama.cpp allocated {reported_mib:.2f} MiB"


CONFIGS = [
    dict(n_ctx=4096, n_parallel=1, kv_cache_type="f16", swa_full=True, n_ubatch=512),
    dict(n_ctx=1024, n_parallel=4, kv_cache_type="q8_0", swa_full=False, n_ubatch=256),
    dict(n_ctx=1000, n_parallel=3, kv_cache_type="f16", swa_full=False, n_ubatch=128,
         kv_unified=False),
]
IDS = ["4k-f16-swa_full", "4x1k-q8_0-window", "3x1000-f16-window-per-sequence"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_estimate_matches_llama_cpp_for_the_default_model(default_gguf, default_model, cfg):
    model, weights = default_model
    report = context_report(model, **cfg)
    est = estimate_memory(default_gguf, **cfg)
    assert_close(est.host_weights, sum(weights.model_buffers.values()), "weights")
    assert_close(est.host_kv, sum(report.kv_buffers.values()), "KV cache")
    assert_close(est.host_compute, sum(report.compute_buffers.values()), "compute")
    assert est.device_total == 0


# the tiny fixture's heads are 16 wide: a q8_0 cache (blocks of 32) does not apply
TINY_CONFIGS = [CONFIGS[0], dict(CONFIGS[1], kv_cache_type="f16"), CONFIGS[2]]


@pytest.mark.parametrize("cfg", TINY_CONFIGS, ids=IDS)
def test_estimate_matches_llama_cpp_for_tiny_gpt_oss(tiny_gguf, tiny_model, cfg):
    model, weights = tiny_model
    report = context_report(model, **cfg)
    est = estimate_memory(tiny_gguf("q8_0"), **cfg, n_cpu_moe=1)
    assert_close(est.host_weights, sum(weights.model_buffers.values()), "weights")
    assert_close(est.host_kv, sum(report.kv_buffers.values()), "KV cache")
    assert_close(est.host_compute, sum(report.compute_buffers.values()), "compute")


def test_window_cache_is_smaller_than_the_full_pool(tiny_gguf):
    path = tiny_gguf("q8_0")
    full = estimate_memory(path, n_ctx=8192, swa_full=True)
    window = estimate_memory(path, n_ctx=8192, swa_full=False)
    assert full.kv_cells == full.kv_cells_swa == 8192
    assert window.kv_cells_swa == 768  # pad256(sliding_window 8 + n_ubatch 512)
    swa = [layer for layer in window.layers if layer.sliding_window]
    assert [layer.index for layer in swa] == [0]  # gpt-oss: even layers use the window
    assert window.host_kv < full.host_kv


def test_offload_arithmetic_follows_llama_cpp_layer_order(tiny_gguf):
    """token_embd stays on the CPU; the last layers and the output go to the GPU first."""
    summary = read_gguf_header(tiny_gguf("q8_0"), probe=False)
    size = {t.name: t.n_bytes for t in summary.tensors}
    cpu = frozenset()  # no repack term: the split alone
    everything = estimate_memory(summary, n_gpu_layers=-1, cpu_features=cpu)
    assert everything.host_weights == size["token_embd.weight"]
    assert everything.device_weights == sum(size.values()) - size["token_embd.weight"]
    output_only = estimate_memory(summary, n_gpu_layers=1, cpu_features=cpu)
    assert output_only.device_weights == size["output.weight"] + size["output_norm.weight"]
    experts0 = sum(n for name, n in size.items() if name.startswith("blk.0.") and is_expert(name))
    moe = estimate_memory(summary, n_gpu_layers=-1, n_cpu_moe=1, cpu_features=cpu)
    assert moe.device_weights == everything.device_weights - experts0
    assert moe.host_weights == everything.host_weights + experts0
    assert moe.layer_map() == ["0: GPU, experts CPU", "1: GPU", "output: GPU"]
    assert output_only.layer_map() == ["0-1: CPU", "output: GPU"]
    all_moe = estimate_memory(summary, n_gpu_layers=-1, cpu_moe=True, cpu_features=cpu)
    assert all_moe.host_weights == size["token_embd.weight"] + all_moe.expert_bytes
    assert all_moe.device_kv == everything.device_kv > 0 and all_moe.host_kv == 0


def test_unknown_kv_cache_type_is_refused(default_gguf):
    with pytest.raises(ValueError, match="q3_x"):
        estimate_memory(default_gguf, kv_cache_type="q3_x")


def test_gpt_oss_20b_predictions_quoted_in_the_readme():
    """Header arithmetic only (the converter's plan for the real shapes; no file is written)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_check import synthetic_summary

    from ggufllm.gpu.placement import plan_placement

    summary = synthetic_summary("full")
    assert len(summary.tensors) == 459
    assert round(sum(t.n_bytes for t in summary.tensors) / 1e9, 1) == 12.1
    gib = lambda n: round(n / 2**30, 1)  # noqa: E731
    none = frozenset()
    full = estimate_memory(summary, n_ctx=8192, n_gpu_layers=-1, cpu_features=none)
    moe = estimate_memory(summary, n_ctx=8192, n_gpu_layers=-1, cpu_moe=True, cpu_features=none)
    assert (gib(full.device_total), gib(full.host_total)) == (11.5, 0.6)
    assert (gib(moe.device_total), gib(moe.host_total)) == (2.0, 10.5)
    long = estimate_memory(summary, n_ctx=32768, n_gpu_layers=-1, cpu_features=none)
    assert gib(long.device_total) == 12.6
    picks = {free: plan_placement(summary, free_bytes=int(free * 2**30), n_ctx=8192, n_parallel=1,
                                  cpu_features=none)
             for free in (16, 11.5, 7.5)}
    assert [(p.n_gpu_layers, p.n_cpu_moe) for p in picks.values()] == [(-1, 0), (-1, 3), (-1, 13)]
