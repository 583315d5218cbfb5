"""What accelerator llama.cpp can use, read from ggml's device registry."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as lib

from .engine.native import ensure_backend

__all__ = ["GpuInfo", "gpu_info"]

# ggml_backend_dev_type: CPU = 0, GPU = 1, ACCEL = 2, IGPU = 3
_GPU_TYPES = (1, 3)
_GB = 1024**3


@dataclass(frozen=True)
class GpuInfo:
    """The first GPU llama.cpp sees, or CPU values (name None, 0 GB)."""

    available: bool
    device: str
    name: str | None
    memory_total_gb: float
    memory_used_gb: float


def _ggml_functions() -> dict[str, Any] | None:
    """ggml's device API from the bundled libggml-base, typed here (llama-cpp-python
    does not bind it)."""
    try:
        ggml = ctypes.CDLL(str(_ggml_base_path()))
    except OSError:
        return None
    fns = {}
    for name, restype, argtypes in (
        ("ggml_backend_dev_count", ctypes.c_size_t, []),
        ("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
        ("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
        ("ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p]),
        ("ggml_backend_dev_memory", None,
         [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]),
    ):
        fn = getattr(ggml, name, None)
        if fn is None:
            return None
        fn.restype, fn.argtypes = restype, argtypes
        fns[name] = fn
    return fns


def _ggml_base_path() -> str:
    import pathlib

    lib_dir = pathlib.Path(lib.__file__).parent / "lib"
    for candidate in sorted(lib_dir.glob("libggml-base.*")):
        return str(candidate)
    raise OSError("libggml-base not found")


def gpu_info() -> GpuInfo:
    """The first GPU device, with its memory in GB; CPU values when there is none."""
    ensure_backend()
    if not lib.llama_supports_gpu_offload():
        return GpuInfo(False, "cpu", None, 0.0, 0.0)
    fns = _ggml_functions()
    if fns is None:
        return GpuInfo(True, "gpu", None, 0.0, 0.0)
    for i in range(fns["ggml_backend_dev_count"]()):
        dev = fns["ggml_backend_dev_get"](i)
        if fns["ggml_backend_dev_type"](dev) not in _GPU_TYPES:
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        fns["ggml_backend_dev_memory"](dev, ctypes.byref(free), ctypes.byref(total))
        name = (fns["ggml_backend_dev_description"](dev) or b"").decode("utf-8", "replace")
        return GpuInfo(True, "cuda", name or None, round(total.value / _GB, 2),
                       round((total.value - free.value) / _GB, 2))
    return GpuInfo(False, "cpu", None, 0.0, 0.0)
