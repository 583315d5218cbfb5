"""On a GPU build with a device (skipped elsewhere): auto offloads, overrides keep experts in RAM,
and what llama.cpp allocates on the device is near the estimate. Not yet run on a GPU."""

from __future__ import annotations

import logging

import pytest

from ggufllm import LLMService
from ggufllm.gpu.devices import gpu_devices
from ggufllm.gpu.estimate import estimate_memory

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_devices(), reason="needs a GPU build of llama-cpp-python "
                                 "and a GPU (ggufllm backend install --preset cuda)")]
TOLERANCE = 0.15  # device figures have not been measured yet; the CPU ones hold 10%


def test_auto_offloads_everything_that_fits(default_gguf):
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    with LLMService(default_gguf, max_length=4096, n_parallel=1) as svc:
        info = svc.get_model_info()
    est = estimate_memory(default_gguf, n_ctx=4096, n_gpu_layers=-1)
    assert info["n_gpu_layers"] == len(est.layers) + 1  # every block and the output
    assert info["layers_on_gpu"] == len(est.layers) + 1
    used = info["gpu_memory_used_mib"]
    assert abs(est.device_total / 2**20 - used) <= TOLERANCE * used


def test_cpu_moe_keeps_experts_in_host_memory_on_the_gpu(tiny_gguf):
    path = tiny_gguf("q8_0")
    with LLMService(path, max_length=1024, n_parallel=1, n_gpu_layers=-1, cpu_moe=True) as svc:
        info = svc.get_model_info()
    assert info["expert_tensors_on_cpu"] == 12 and info["n_gpu_layers"] == 3
    assert info["gpu_memory_used_mib"] > 0
