"""The backends of a llama.cpp built with ``GGML_BACKEND_DL`` (the ``cpu-portable`` preset).

Such a build links no backend into ``libggml``: each is a module (``libggml-cpu-haswell.so``,
``libggml-cpu-skylakex.so``, ..., ``libggml-cuda.so``) that must be loaded before the first
model. ``llama_backend_init`` loads them only from the executable's folder and the current
folder (vendored ``ggml/src/ggml-backend-reg.cpp``, ``ggml_backend_load_best``), never from
``llama_cpp/lib`` where llama-cpp-python installs them, so ggufllm loads them from there. For
each backend ggml scores every module against this CPU and keeps the best one.
"""

from __future__ import annotations

import ctypes
import pathlib

import llama_cpp.llama_cpp as lib

__all__ = ["load_backends"]


def _libggml() -> ctypes.CDLL:
    """The libggml that libllama itself uses.

    On Linux the wheel holds ``libggml.so``, ``.so.0`` and ``.so.0.x`` as three copies (a wheel
    has no symlinks): opening ``libggml.so`` by path, as ``llama_cpp._ggml`` does, maps a second
    libggml with a backend registry of its own. A symbol looked up through libllama's handle
    resolves in libllama's own dependencies. (Windows has one ``ggml.dll`` and no such lookup.)
    """
    if hasattr(lib._lib, "ggml_backend_load_all_from_path"):
        return lib._lib
    import llama_cpp._ggml

    return llama_cpp._ggml.libggml


def load_backends() -> int:
    """Registers the dynamic backends in ``llama_cpp/lib``; call before ``llama_backend_init``.

    A build with its backends compiled in (the default) has them registered already and
    loads nothing here.

    Returns:
        The number of backends registered afterwards.
    """
    f = _libggml()
    f.ggml_backend_reg_count.restype = ctypes.c_size_t
    f.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    f.ggml_backend_load_all_from_path.restype = None
    if f.ggml_backend_reg_count() == 0:
        lib_dir = pathlib.Path(lib.__file__).parent / "lib"
        f.ggml_backend_load_all_from_path(str(lib_dir).encode())
    return int(f.ggml_backend_reg_count())
