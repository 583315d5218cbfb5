"""Placement: cpu_moe / n_cpu_moe overrides reach llama.cpp (asserted from its load log),
auto placement fits a device of a given size, and get_model_info reports what llama.cpp did."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import llama_cpp.llama_cpp as lib
import pytest

from ggufllm import LLMService
from ggufllm.config import load_settings
from ggufllm.engine.native import NativeModel
from ggufllm.gguf_file import read_gguf_header
from ggufllm.gpu.estimate import is_expert
from ggufllm.gpu.placement import GPU_MARGIN_BYTES, LoadReport, expert_patterns, observe_load, plan_placement


def loaded_report(path, **kwargs) -> LoadReport:
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    with observe_load() as report:
        NativeModel(str(path), n_gpu_layers=0, **kwargs).close()
    return report


def expert_names(path, layers=None) -> set[str]:
    summary = read_gguf_header(path)
    return {t.name for t in summary.tensors if is_expert(t.name)
            and (layers is None or int(t.name.split(".")[1]) in layers)}


def test_n_cpu_moe_overrides_reach_llama_cpp(tiny_gguf):
    path = tiny_gguf("q8_0")
    report = loaded_report(path, n_cpu_moe=1)
    # llama.cpp logs "tensor NAME (... MiB TYPE) buffer type overridden to BUFT" per tensor;
    # an override to ggml's CPU buffer type lets llama.cpp pick a CPU extra buffer type
    # (CPU_REPACK...) for it, as its --n-cpu-moe does: host memory either way
    assert set(report.overrides) == expert_names(path, {0}) and len(report.overrides) == 6
    assert report.overrides.values() and all(v.startswith("CPU") for v in report.overrides.values())


@pytest.fixture(scope="module")
def cpu_moe_service(tiny_gguf) -> Iterator[LLMService]:
    """The tiny gpt-oss loaded by the service with ``cpu_moe`` (one load, two tests)."""
    with LLMService(tiny_gguf("q8_0"), max_length=256, n_parallel=1, cpu_moe=True) as svc:
        yield svc


@pytest.fixture(scope="module")
def plain_load(tiny_gguf) -> tuple[LoadReport, list[logging.LogRecord], int]:
    """A load without overrides under a logger set to ERROR: what observe_load saw, the
    records the logger passed on to its handlers meanwhile, and the logger's level after
    (one load, two tests)."""
    native = logging.getLogger("ggufllm.llama_cpp")
    native.setLevel(logging.ERROR)
    passed: list[logging.LogRecord] = []
    handler = logging.Handler(logging.NOTSET)
    handler.emit = passed.append  # type: ignore[method-assign]
    native.addHandler(handler)
    try:
        report = loaded_report(tiny_gguf("q8_0"))
    finally:
        native.removeHandler(handler)
    return report, passed, native.level


def test_cpu_moe_overrides_every_expert_tensor(tiny_gguf, cpu_moe_service, plain_load):
    path = tiny_gguf("q8_0")
    report = cpu_moe_service._load_report
    assert report is not None
    assert set(report.overrides) == expert_names(path) and len(report.overrides) == 12
    assert plain_load[0].overrides == {}


def test_patterns_are_llama_cpp_n_cpu_moe_patterns():
    assert expert_patterns(False, 2) == [r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps",
                                         r"blk\.1\.ffn_(up|down|gate|gate_up)_(ch|)exps"]
    assert expert_patterns(True, 0) == [r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"]
    assert expert_patterns(False, 0) == []


def test_observe_load_passes_on_only_what_the_logger_let_through(plain_load):
    report, passed, level = plain_load
    assert report.model_buffers and not [r for r in passed if r.levelno < logging.ERROR]
    assert level == logging.ERROR


@pytest.mark.skipif(bool(lib.llama_supports_gpu_offload()), reason="CPU build behaviour")
def test_auto_resolves_to_no_gpu_layers_on_a_cpu_build(tiny_gguf):
    plan = plan_placement(tiny_gguf("q8_0"), n_gpu_layers="auto")
    assert (plan.n_gpu_layers, plan.reason) == (0, "no GPU: everything on the CPU")
    assert plan.estimate is not None and plan.estimate.device_total == 0


def test_auto_offloads_all_then_experts_then_layers(tiny_gguf):
    """On a simulated card: the free memory each step needs, from the estimate itself."""
    path = tiny_gguf("q8_0")
    kv = dict(n_ctx=2048, n_parallel=1, flash_attn=True)
    full = plan_placement(path, n_gpu_layers=-1, free_bytes=1 << 40, **kv).estimate
    fits = plan_placement(path, free_bytes=full.device_total + GPU_MARGIN_BYTES, **kv)
    assert (fits.n_gpu_layers, fits.cpu_moe, fits.n_cpu_moe) == (-1, False, 0)
    one = plan_placement(path, free_bytes=full.device_total + GPU_MARGIN_BYTES - 1, **kv)
    assert (one.n_gpu_layers, one.n_cpu_moe) == (-1, 1)
    assert one.estimate.device_total <= full.device_total + GPU_MARGIN_BYTES - 1
    no_experts = plan_placement(path, n_gpu_layers=-1, cpu_moe=True, free_bytes=1 << 40, **kv)
    squeezed = plan_placement(path, free_bytes=no_experts.estimate.device_total
                              + GPU_MARGIN_BYTES - 1, **kv)
    assert squeezed.cpu_moe and squeezed.n_gpu_layers < 3  # 2 layers + output
    nothing = plan_placement(path, free_bytes=GPU_MARGIN_BYTES, **kv)
    assert nothing.n_gpu_layers == 0 and nothing.estimate.device_total == 0


def test_settings_take_auto_and_numbers(monkeypatch):
    assert load_settings().n_gpu_layers == "auto"
    monkeypatch.setenv("N_GPU_LAYERS", "auto")
    assert load_settings().n_gpu_layers == "auto"
    monkeypatch.setenv("N_GPU_LAYERS", "-1")
    assert load_settings().n_gpu_layers == -1
    monkeypatch.setenv("N_GPU_LAYERS", "most")
    with pytest.raises(Exception, match="N_GPU_LAYERS"):
        load_settings()


def test_model_info_reports_what_llama_cpp_placed(cpu_moe_service):
    info = cpu_moe_service.get_model_info()
    assert info["expert_tensors_on_cpu"] == 12  # from llama.cpp's log, one line per tensor
    assert info["n_gpu_layers"] == 0 and info["layers_on_gpu"] == 0
    assert info["gpu_memory_used_mib"] == 0
    assert info["host_memory_used_mib"] > 26  # the weights alone are 26 MiB
    assert set(info["buffers_mib"]) == {"model", "kv", "compute"}
