"""Rebuilding llama-cpp-python with a preset: preflight checks, the build, and what went wrong.

The failures users of llama-cpp-python hit most (its issues #1986, #2081, #1617, #1538)
are checked before and after the build: nvcc missing from PATH (CMake then builds a
CPU-only library without a word), a host compiler newer than nvcc supports, and a
"successful" build that has no GPU offload in it. A build with dynamic backends
(``cpu-portable``) must also leave a CPU backend that loads from ``llama_cpp/lib``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .presets import Preset, build_command

__all__ = ["BuildResult", "KNOWN_CAUSES", "diagnose", "loads_cpu_backend", "preflight", "run_build",
           "supports_gpu_offload", "verdict"]

# (pattern in the build log, what it means and what to do)
KNOWN_CAUSES = (
    (r"No CMAKE_CUDA_COMPILER could be found|nvcc: not found|Failed to find nvcc",
     "nvcc is not on PATH: install the CUDA toolkit and add its bin folder to PATH "
     "(or set CUDACXX=/usr/local/cuda/bin/nvcc)"),
    (r"unsupported GNU version|unsupported Microsoft Visual Studio version|"
     r"-allow-unsupported-compiler",
     "the host compiler is newer than this nvcc supports: set CUDAHOSTCXX to an older g++ "
     "(e.g. g++-12) or upgrade the CUDA toolkit"),
    (r"Could NOT find Vulkan|glslc", "the Vulkan SDK (headers and glslc) is missing"),
    (r"Could NOT find CUDAToolkit", "the CUDA toolkit was not found (CUDA_PATH / CUDAToolkit_ROOT)"),
    (r"No space left on device", "the disk is full"),
    (r"Could not find a version that satisfies|Failed to establish a new connection",
     "pip could not reach the package index: build from a local sdist with --source"),
)
# newest GCC major each CUDA release accepts (CUDA's host_config.h)
_MAX_GCC = ((12, 0, 12), (12, 4, 13), (12, 8, 14), (13, 0, 15))


@dataclass(frozen=True)
class BuildResult:
    ok: bool
    log: Path
    gpu_offload: bool | None  # None: not checked (the build failed)
    causes: tuple[str, ...]


def _nvcc() -> str | None:
    return os.environ.get("CUDACXX") or shutil.which("nvcc")


def _version(cmd: list[str], pattern: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(pattern, out)
    return tuple(int(x) for x in m.groups()) if m else None


def preflight(preset: Preset) -> tuple[list[str], list[str]]:
    """Problems that stop a build before it starts, and warnings.

    Returns:
        (errors, warnings): human-readable lines.
    """
    errors: list[str] = []
    warnings: list[str] = []
    if not preset.available:
        errors.append(f"preset {preset.name!r} does not apply to this system")
    if preset.backend != "cuda":
        return errors, warnings
    nvcc = _nvcc()
    if nvcc is None:
        errors.append("nvcc is not on PATH: CMake would silently build a CPU-only library. "
                      "Install the CUDA toolkit and add its bin folder to PATH "
                      "(or set CUDACXX=/path/to/nvcc)")
        return errors, warnings
    cuda = _version([nvcc, "--version"], r"release (\d+)\.(\d+)")
    gcc = _version([os.environ.get("CUDAHOSTCXX", "g++"), "-dumpfullversion"], r"^(\d+)")
    if cuda and gcc:
        limit = max((g for major, minor, g in _MAX_GCC if (major, minor) <= cuda), default=None)
        if limit is not None and gcc[0] > limit:
            warnings.append(f"g++ {gcc[0]} is newer than CUDA {cuda[0]}.{cuda[1]} supports "
                            f"(<= {limit}): set CUDAHOSTCXX=g++-{limit} if the build fails")
    return errors, warnings


def diagnose(log_text: str) -> tuple[str, ...]:
    """The known causes whose signature appears in a build log."""
    return tuple(why for pattern, why in KNOWN_CAUSES if re.search(pattern, log_text))


# A GGML_BACKEND_DL build registers no backend until one is loaded, and llama_backend_init
# looks only beside the executable and in the current folder (ggml-backend-reg.cpp,
# ggml_backend_load_best), never in llama_cpp/lib where the modules are installed. A build
# with its backends compiled in has them registered already: then this loads nothing.
# The calls go through libllama's handle: on Linux the wheel holds libggml.so, .so.0 and
# .so.0.x as three copies, and opening libggml.so by path (llama_cpp._ggml) maps a second
# libggml with a registry of its own; a symbol looked up through libllama resolves in the
# libggml libllama uses.
_LOAD_BACKENDS = """
import ctypes, pathlib
import llama_cpp.llama_cpp as l
if hasattr(l._lib, "ggml_backend_reg_count"):
    f = l._lib
else:  # Windows: GetProcAddress does not look into llama.dll's dependencies
    import llama_cpp._ggml as g
    f = g.libggml
f.ggml_backend_reg_count.restype = ctypes.c_size_t
if f.ggml_backend_reg_count() == 0:
    f.ggml_backend_load_all_from_path(str(pathlib.Path(l.__file__).parent / "lib").encode())
"""


def _ask(python: str, code: str) -> bool:
    out = subprocess.run([python, "-c", _LOAD_BACKENDS + code], capture_output=True, text=True,
                         timeout=300)
    return out.returncode == 0 and out.stdout.strip().endswith("1")


def supports_gpu_offload(python: str = sys.executable) -> bool:
    """Asks a fresh interpreter whether the installed llama.cpp has GPU offload compiled in."""
    return _ask(python, "l.llama_backend_init(); print(int(l.llama_supports_gpu_offload()))")


def loads_cpu_backend(python: str = sys.executable) -> bool:
    """Asks a fresh interpreter whether the installed llama.cpp has a CPU device.

    A build with dynamic backends has one only if a ``libggml-cpu-*.so`` for this CPU
    landed in ``llama_cpp/lib`` and loads there.
    """
    return _ask(python, "f.ggml_backend_dev_by_type.restype = ctypes.c_void_p; "
                        "f.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]; "
                        "print(int(bool(f.ggml_backend_dev_by_type(0))))")  # GGML_BACKEND_DEVICE_TYPE_CPU


_STEP = re.compile(r"\[(\d+)/(\d+)\]")


def run_build(preset: Preset, log: Path, *, source: str | None = None,
              build_isolation: bool = True,
              on_progress: Callable[[int, int], None] | None = None) -> BuildResult:
    """Runs the pip build, streaming its output into ``log`` and ninja's ``[n/N]`` into ``on_progress``.

    Returns:
        Whether it built, whether GPU offload is compiled in, and known causes of a failure
        (a CPU fallback of a GPU preset counts as one, and so does a dynamic-backend build
        with no loadable CPU backend).
    """
    cmd, extra_env = build_command(preset, source, build_isolation)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n# env: {extra_env}\n")
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **extra_env}, bufsize=1) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                m = _STEP.search(line)
                if m and on_progress is not None:
                    on_progress(int(m.group(1)), int(m.group(2)))
            rc = proc.wait()
    text = log.read_text(encoding="utf-8", errors="replace")
    if rc != 0:
        return BuildResult(False, log, None, diagnose(text))
    cpu = loads_cpu_backend() if preset.dynamic_backends else True
    return verdict(preset, log, supports_gpu_offload(), text, cpu_backend=cpu)


def verdict(preset: Preset, log: Path, offload: bool, log_text: str, *,
            cpu_backend: bool = True) -> BuildResult:
    """A finished build's result.

    A GPU preset whose library has no GPU offload failed, and so did a build that left no
    CPU backend to load (``cpu_backend``: a dynamic-backend build whose modules are not in
    ``llama_cpp/lib``).
    """
    causes: tuple[str, ...] = ()
    if preset.backend != "cpu" and not offload:
        causes = ("CPU fallback detected: the build finished but llama_supports_gpu_offload() is "
                  "false", *diagnose(log_text))
    if not cpu_backend:
        causes += ("no CPU backend: the build finished but no libggml-cpu-*.so in llama_cpp/lib "
                   "loads on this CPU (is CMAKE_INSTALL_BINDIR=llama_cpp/lib set?)",)
    return BuildResult(not causes, log, offload, causes)
