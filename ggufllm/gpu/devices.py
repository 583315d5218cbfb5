"""What llama.cpp can run on, read from ggml's backend registry in the bundled libraries.

llama-cpp-python binds none of ggml's device API, so the few functions used here
are typed with ctypes against the libraries llama-cpp-python already loaded
(``libggml`` holds the registry, ``libggml-base`` the per-device calls). No extra
GPU package is needed: a CUDA build of llama-cpp-python brings its CUDA device.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as lib

from ..native.runtime import ensure_backend

__all__ = ["Device", "GpuInfo", "backends", "cpu_buffer_type", "cpu_features", "devices",
           "extra_buffer_types", "gpu_info", "versions"]

# ggml_backend_dev_type
_KINDS = {0: "cpu", 1: "gpu", 2: "accel", 3: "igpu"}
_GPU_KINDS = ("gpu", "igpu")
_GB = 1024**3
_SIG: dict[str, tuple[str, Any, list[Any]]] = {
    # name: (library, restype, argtypes)
    "ggml_backend_reg_count": ("ggml", ctypes.c_size_t, []),
    "ggml_backend_reg_get": ("ggml", ctypes.c_void_p, [ctypes.c_size_t]),
    "ggml_backend_dev_count": ("ggml", ctypes.c_size_t, []),
    "ggml_backend_dev_get": ("ggml", ctypes.c_void_p, [ctypes.c_size_t]),
    "ggml_backend_reg_name": ("ggml-base", ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_dev_name": ("ggml-base", ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_dev_description": ("ggml-base", ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_backend_dev_type": ("ggml-base", ctypes.c_int, [ctypes.c_void_p]),
    "ggml_backend_dev_memory": ("ggml-base", None, [ctypes.c_void_p,
                                                    ctypes.POINTER(ctypes.c_size_t),
                                                    ctypes.POINTER(ctypes.c_size_t)]),
    "ggml_backend_cpu_buffer_type": ("ggml-base", ctypes.c_void_p, []),
    "ggml_backend_dev_by_type": ("ggml", ctypes.c_void_p, [ctypes.c_int]),
    "ggml_backend_dev_backend_reg": ("ggml-base", ctypes.c_void_p, [ctypes.c_void_p]),
    "ggml_backend_reg_get_proc_address": ("ggml-base", ctypes.c_void_p,
                                          [ctypes.c_void_p, ctypes.c_char_p]),
    "ggml_backend_buft_name": ("ggml-base", ctypes.c_char_p, [ctypes.c_void_p]),
    "ggml_version": ("ggml-base", ctypes.c_char_p, []),
    "ggml_commit": ("ggml-base", ctypes.c_char_p, []),
}


@dataclass(frozen=True)
class Device:
    """One ggml backend device (the CPU is one too)."""

    index: int
    name: str  # "CPU", "CUDA0", "Vulkan0", ...
    description: str
    kind: str  # cpu | gpu | igpu | accel
    free_bytes: int
    total_bytes: int

    @property
    def is_gpu(self) -> bool:
        return self.kind in _GPU_KINDS


@dataclass(frozen=True)
class GpuInfo:
    """The first GPU llama.cpp sees, or CPU values (name None, 0 GB)."""

    available: bool
    device: str
    name: str | None
    memory_total_gb: float
    memory_used_gb: float


def _library(stem: str) -> ctypes.CDLL:
    # Through libllama's own handle where it resolves ggml's symbols: on Linux the wheel holds
    # libggml.so, .so.0 and .so.0.x as three copies, and opening libggml.so by path maps a
    # second libggml with a backend registry of its own (empty on a cpu-portable build).
    if hasattr(lib._lib, "ggml_backend_reg_count"):
        return ctypes.CDLL(lib._lib._name)  # the same handle, functions of our own
    lib_dir = pathlib.Path(lib.__file__).parent / "lib"
    for pattern in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll", f"lib{stem}.*"):
        for candidate in sorted(lib_dir.glob(pattern)):
            # the same file llama_cpp loaded: dlopen hands back the loaded copy
            return ctypes.CDLL(str(candidate))
    raise OSError(f"lib{stem} not found in {lib_dir}")


@functools.lru_cache(maxsize=1)
def _ggml() -> dict[str, Any]:
    """ggml's device API, typed (raises OSError when a library or symbol is missing)."""
    ensure_backend()
    libs = {"ggml": _library("ggml"), "ggml-base": _library("ggml-base")}
    fns = {}
    for name, (stem, restype, argtypes) in _SIG.items():
        fn = getattr(libs[stem], name, None)
        if fn is None:
            raise OSError(f"{name} is missing from lib{stem}")
        fn.restype, fn.argtypes = restype, argtypes
        fns[name] = fn
    return fns


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", "replace")


def backends() -> list[str]:
    """Names of the backends compiled into the bundled ggml (``CPU``, ``CUDA``, ...)."""
    f = _ggml()
    return [_text(f["ggml_backend_reg_name"](f["ggml_backend_reg_get"](i)))
            for i in range(f["ggml_backend_reg_count"]())]


def devices() -> list[Device]:
    """Every device ggml sees, with its free and total memory in bytes."""
    f = _ggml()
    out = []
    for i in range(f["ggml_backend_dev_count"]()):
        dev = f["ggml_backend_dev_get"](i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        f["ggml_backend_dev_memory"](dev, ctypes.byref(free), ctypes.byref(total))
        out.append(Device(i, _text(f["ggml_backend_dev_name"](dev)),
                          _text(f["ggml_backend_dev_description"](dev)),
                          _KINDS.get(f["ggml_backend_dev_type"](dev), "unknown"),
                          int(free.value), int(total.value)))
    return out


def gpu_devices() -> list[Device]:
    """The GPU devices (empty on a CPU build or a machine without a GPU)."""
    if not lib.llama_supports_gpu_offload():
        return []
    return [d for d in devices() if d.is_gpu]


def cpu_buffer_type() -> int:
    """The address of ggml's CPU buffer type (what ``--n-cpu-moe`` overrides point at)."""
    return int(_ggml()["ggml_backend_cpu_buffer_type"]())


def extra_buffer_types() -> list[str]:
    """The CPU's extra buffer types this build offers (``CPU_REPACK``, ``AMX``...), the ones
    ``CPU_EXTRA_BUFFERS`` turns on or off."""
    f = _ggml()
    cpu = f["ggml_backend_dev_by_type"](0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not cpu:
        return []
    address = f["ggml_backend_reg_get_proc_address"](f["ggml_backend_dev_backend_reg"](cpu),
                                                     b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return []
    get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    array, names = get(cpu), []
    while array and array[len(names)]:
        names.append(_text(f["ggml_backend_buft_name"](array[len(names)])))
    return names


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """CPU features ggml was built with and found (``AVX2``, ``REPACK``, ...)."""
    ensure_backend()
    text = _text(lib.llama_print_system_info())
    return frozenset(part.split("=")[0].strip() for part in text.replace("CPU :", "|").split("|")
                     if part.strip().endswith("= 1"))


def versions() -> dict[str, str]:
    """ggufllm, llama-cpp-python and ggml/llama.cpp versions (commit when the build knows it)."""
    from importlib.metadata import PackageNotFoundError, version

    import llama_cpp

    try:
        ours = version("ggufllm")
    except PackageNotFoundError:
        ours = "unknown"
    try:
        f = _ggml()
        ggml_version, commit = _text(f["ggml_version"]()), _text(f["ggml_commit"]())
    except OSError:
        ggml_version, commit = "unknown", "unknown"
    return {"ggufllm": ours, "llama-cpp-python": llama_cpp.__version__,
            "ggml": ggml_version, "llama.cpp commit": commit or "unknown"}


def gpu_info() -> GpuInfo:
    """The first GPU device, with its memory in GB; CPU values when there is none."""
    try:
        gpus = gpu_devices()
    except OSError:
        gpus = []
    if not gpus:
        return GpuInfo(False, "cpu", None, 0.0, 0.0)
    d = gpus[0]
    return GpuInfo(True, d.name.rstrip("0123456789").lower() or "gpu", d.description or d.name,
                   round(d.total_bytes / _GB, 2), round((d.total_bytes - d.free_bytes) / _GB, 2))
