"""The native layer: what ggufllm asks of llama.cpp's build and CPU before a model loads.

- :mod:`.kernels`: the CPU kernel self-test (may this build use its extra buffer
  types, the repacked layouts and AMX, on this CPU?) and its remembered verdicts.
- :mod:`.kernel_model`: the tiny model that self-test decodes, cut from the real
  model's weight types.
- :mod:`.backends`: loads the CPU modules of a ``cpu-portable`` build before the first model.
- ``_kernel_child.py``, ``_probe_child.py``: the scripts the self-test and the probe load
  run in child processes (they import nothing from the ggufllm package).
"""

from .kernels import ExtraBuffersMode, KernelVerdict, decide_extra_buffers

__all__ = ["ExtraBuffersMode", "KernelVerdict", "decide_extra_buffers"]
