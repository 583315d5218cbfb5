"""Build presets for llama-cpp-python's native library, read from the top-level ``CMakePresets.json``.

A preset is a table of CMake cache variables (``GGML_CUDA=ON``,
``CMAKE_CUDA_ARCHITECTURES=90``...). ``ggufllm backend install --preset NAME`` hands them to
pip's build of llama-cpp-python as ``CMAKE_ARGS``: the same file serves ``cmake --preset``
users and the installer, so the two cannot drift.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["LLAMA_CPP_PYTHON", "Preset", "build_command", "find_presets_file", "load_presets"]

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # the pinned version (pyproject.toml)
_GPU_SWITCHES = ("GGML_CUDA", "GGML_VULKAN", "GGML_METAL", "GGML_HIP", "GGML_SYCL")


@dataclass(frozen=True)
class Preset:
    """One configure preset, its inherited cache variables merged."""

    name: str
    display_name: str
    cache_variables: dict[str, str]
    available: bool  # its condition holds on this host (metal: macOS only)

    @property
    def backend(self) -> str:
        """``cuda``, ``vulkan``, ``metal``... or ``cpu``."""
        for switch in _GPU_SWITCHES:
            if self.cache_variables.get(switch, "OFF").upper() == "ON":
                return switch.removeprefix("GGML_").lower()
        return "cpu"

    @property
    def dynamic_backends(self) -> bool:
        """``GGML_BACKEND_DL``: the backends are ``libggml-*.so`` modules loaded at run time.

        ``cpu-portable`` builds one CPU module per instruction-set level and the best one
        for the running CPU is picked when the backends are loaded.
        """
        return self.cache_variables.get("GGML_BACKEND_DL", "OFF").upper() == "ON"

    @property
    def cmake_args(self) -> str:
        """The ``CMAKE_ARGS`` value: one ``-DNAME=VALUE`` per cache variable."""
        return " ".join(shlex.quote(f"-D{k}={v}") for k, v in self.cache_variables.items())


def find_presets_file(start: Path | None = None) -> Path:
    """The ``CMakePresets.json`` of this source checkout.

    Raises:
        ConfigError: not found (ggufllm was installed without its source tree).
    """
    here = start or Path(__file__).resolve().parents[2]
    candidate = here / "CMakePresets.json"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"CMakePresets.json not found in {here}; run from a source checkout "
                      "of ggufllm or pass --presets-file", "presets_file")


def _condition_holds(condition: dict[str, Any] | None) -> bool:
    if not condition:
        return True
    host = {"Darwin": "Darwin", "Linux": "Linux", "Windows": "Windows"}.get(platform.system(),
                                                                             platform.system())
    expand = lambda s: str(s).replace("${hostSystemName}", host)  # noqa: E731
    kind = condition.get("type")
    if kind == "equals":
        return expand(condition["lhs"]) == expand(condition["rhs"])
    if kind == "notEquals":
        return expand(condition["lhs"]) != expand(condition["rhs"])
    return True  # other condition types: let cmake judge


def load_presets(path: Path | None = None) -> dict[str, Preset]:
    """The visible configure presets, by name, in file order.

    Raises:
        ConfigError: the file is missing or not valid presets JSON.
    """
    path = path or find_presets_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        raw = {p["name"]: p for p in data["configurePresets"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable CMake presets file ({exc})", "presets_file") \
            from None

    def variables(name: str, seen: tuple[str, ...] = ()) -> dict[str, str]:
        if name in seen:
            raise ConfigError(f"{path}: preset {name!r} inherits itself", "presets_file")
        p = raw[name]
        parents = p.get("inherits", [])
        merged: dict[str, str] = {}
        for parent in [parents] if isinstance(parents, str) else parents:
            merged |= variables(parent, (*seen, name))
        for k, v in p.get("cacheVariables", {}).items():
            merged[k] = v["value"] if isinstance(v, dict) else str(v)
        return merged

    return {name: Preset(name, p.get("displayName", name), variables(name),
                         _condition_holds(p.get("condition")))
            for name, p in raw.items() if not p.get("hidden")}


def build_command(preset: Preset, source: str | None = None,
                  build_isolation: bool = True) -> tuple[list[str], dict[str, str]]:
    """The pip command that rebuilds llama-cpp-python with ``preset``, and the variables it adds.

    ``--no-deps`` keeps ``--force-reinstall`` from reinstalling numpy and the other
    dependencies: only llama-cpp-python is rebuilt. ``--no-cache-dir``: pip's wheel cache
    is keyed by the version, not by ``CMAKE_ARGS``, and would hand back the wheel it built
    before (a ``CMAKE_ARGS=-DGGML_NATIVE=OFF pip install`` without it reinstalls the native one).

    Args:
        preset: the preset to build.
        source: an sdist or source folder to build from (offline); None = the registry.
        build_isolation: False builds with this environment's scikit-build-core
            (needed offline).

    Raises:
        ConfigError: this is a PyInstaller bundle (no pip; its libraries are part of it).
    """
    if getattr(sys, "frozen", False):  # sys.executable is the bundle, not a Python with pip
        raise ConfigError("a bundled ggufllm cannot rebuild its llama.cpp: run `ggufllm backend "
                          "install` in a pip install of ggufllm, then build the bundle again",
                          "preset")
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-cache-dir", "--force-reinstall",
           "--no-deps"]
    if not build_isolation:
        cmd.append("--no-build-isolation")
    cmd += [source] if source else ["--no-binary", "llama-cpp-python", LLAMA_CPP_PYTHON]
    env = {"CMAKE_ARGS": preset.cmake_args, "FORCE_CMAKE": "1",
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    return cmd, env
