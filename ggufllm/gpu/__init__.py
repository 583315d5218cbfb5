"""GPU support: devices, memory estimates, placement (layers and MoE experts), build presets.

- :mod:`.devices`: ggml's device registry (backends compiled in, free/total memory).
- :mod:`.estimate`: :func:`estimate_memory`, our arithmetic of what a load allocates.
- :mod:`.placement`: ``N_GPU_LAYERS=auto``, ``cpu_moe``/``n_cpu_moe`` tensor overrides,
  and what llama.cpp reports having placed where.
- :mod:`.presets`: the CMake presets a CUDA/Vulkan/Metal rebuild uses.
- :mod:`.cli`: the ``doctor`` and ``backend install`` commands.
"""

from .devices import Device, GpuInfo, backends, devices, gpu_info, versions
from .estimate import MemoryEstimate, estimate_memory
from .placement import LoadReport, Placement, plan_placement

__all__ = ["Device", "GpuInfo", "LoadReport", "MemoryEstimate", "Placement", "backends",
           "devices", "estimate_memory", "gpu_info", "plan_placement", "versions"]
