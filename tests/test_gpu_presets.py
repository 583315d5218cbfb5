"""CMakePresets.json: cmake reads it, each preset sets the right cache variables, and
``ggufllm backend install`` turns them into the right CMAKE_ARGS (dry run: nothing is built)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggufllm.cli import cli
from ggufllm.gpu.install import diagnose, loads_cpu_backend, preflight, supports_gpu_offload, verdict
from ggufllm.gpu.presets import LLAMA_CPP_PYTHON, find_presets_file, load_presets

ROOT = Path(__file__).resolve().parents[1]
CUDA_ARCHS = {"cuda": "75;80;86;89;90", "cuda-sm80": "80", "cuda-sm86": "86",
              "cuda-sm89": "89", "cuda-sm90": "90"}


def _cmake() -> str:
    path = shutil.which("cmake")
    assert path, "cmake is needed (apt-get install cmake; .ci/run installs it)"
    return path


def test_cmake_lists_exactly_the_presets_we_read():
    out = subprocess.run([_cmake(), "--list-presets"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    listed = re.findall(r'^\s+"([\w-]+)"', out, re.M)
    ours = [name for name, p in load_presets().items() if p.available]
    assert listed == ours
    assert {"cpu", "cpu-portable", "cpu-avx2", "cuda", "cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90",
            "vulkan"} <= set(listed)
    assert "metal" in load_presets()  # present, but its condition holds on macOS only


@pytest.mark.parametrize("name", ["cpu", "cpu-portable", "cpu-avx2", "cuda", "cuda-sm90", "vulkan"])
def test_cmake_configures_each_preset_with_the_variables_we_pass(name, tmp_path: Path):
    # A project with no languages: cmake applies the preset's cache variables and stops.
    shutil.copy(find_presets_file(), tmp_path / "CMakePresets.json")
    (tmp_path / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.25)\n"
                                             "project(presets_check NONE)\n")
    subprocess.run([_cmake(), "--preset", name], cwd=tmp_path, capture_output=True, check=True)
    cache = (tmp_path / "build" / name / "CMakeCache.txt").read_text()
    cmake_vars = dict(re.findall(r"^(\w+):\w+=(.*)$", cache, re.M))
    for k, v in load_presets()[name].cache_variables.items():
        assert cmake_vars[k] == v


@pytest.mark.parametrize("name,backend", [("cpu", "cpu"), ("cpu-portable", "cpu"), ("cpu-avx2", "cpu"),
                                          ("cuda", "cuda"), ("cuda-sm80", "cuda"),
                                          ("cuda-sm86", "cuda"), ("cuda-sm89", "cuda"),
                                          ("cuda-sm90", "cuda"), ("vulkan", "vulkan"),
                                          ("metal", "metal")])
def test_each_preset_maps_to_its_cmake_args(name, backend):
    preset = load_presets()[name]
    args = dict(a.removeprefix("-D").split("=", 1) for a in shlex.split(preset.cmake_args))
    assert preset.backend == backend
    assert args.get("GGML_CUDA") == ("ON" if backend == "cuda" else None)
    assert args.get("CMAKE_CUDA_ARCHITECTURES") == CUDA_ARCHS.get(name)
    assert args.get("GGML_VULKAN") == ("ON" if backend == "vulkan" else None)
    assert args.get("GGML_METAL") == ("ON" if backend == "metal" else None)
    assert args["CMAKE_BUILD_TYPE"] == "Release"


def test_the_portable_presets_compile_nothing_for_the_build_machine():
    """Only ``cpu`` builds for the CPU it is built on (-march=native). ``cpu-portable`` builds
    one backend module per CPU level (ggml's GGML_CPU_ALL_VARIANTS needs GGML_BACKEND_DL),
    installed in llama_cpp/lib beside libllama so that a wheel carries them; ``cpu-avx2``
    names its instruction sets, which -DGGML_NATIVE=OFF alone drops under SOURCE_DATE_EPOCH."""
    presets = load_presets()
    assert presets["cpu"].cache_variables["GGML_NATIVE"] == "ON"
    portable = presets["cpu-portable"].cache_variables
    assert portable["GGML_NATIVE"] == "OFF"
    assert portable["GGML_BACKEND_DL"] == portable["GGML_CPU_ALL_VARIANTS"] == "ON"
    assert portable["CMAKE_INSTALL_BINDIR"] == "llama_cpp/lib"
    avx2 = presets["cpu-avx2"].cache_variables
    assert avx2["GGML_NATIVE"] == "OFF"
    for switch in ("GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"):
        assert avx2[switch] == "ON"
    assert avx2["GGML_AVX512"] == "OFF"
    assert not any(k.startswith("GGML_AMX") and v == "ON" for k, v in avx2.items())
    assert [name for name, p in presets.items() if p.dynamic_backends] == ["cpu-portable"]


def test_backend_install_dry_run_prints_the_exact_command_and_env():
    result = CliRunner().invoke(cli, ["backend", "install", "--preset", "cuda-sm86", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    env = dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z_]+=", line))
    assert shlex.split(env["CMAKE_ARGS"]) == shlex.split(load_presets()["cuda-sm86"].cmake_args)
    assert "-DCMAKE_CUDA_ARCHITECTURES=86" in env["CMAKE_ARGS"]
    command = lines[-1].split()
    assert command[1:4] == ["-m", "pip", "install"]
    for flag in ("--no-cache-dir", "--force-reinstall", "--no-deps"):
        assert flag in command
    assert command[-3:] == ["--no-binary", "llama-cpp-python", LLAMA_CPP_PYTHON]


def test_backend_install_dry_run_of_the_portable_preset():
    result = CliRunner().invoke(cli, ["backend", "install", "--preset", "cpu-portable", "--dry-run"])
    assert result.exit_code == 0, result.output
    env = dict(line.split("=", 1) for line in result.output.splitlines()
               if re.match(r"^[A-Z_]+=", line))
    args = shlex.split(env["CMAKE_ARGS"])
    for arg in ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON",
                "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib"):
        assert arg in args
    assert "-DGGML_CUDA=ON" not in args


def test_backend_install_offline_source_and_unknown_preset():
    runner = CliRunner()
    result = runner.invoke(cli, ["backend", "install", "--preset", "cuda", "--dry-run",
                                 "--source", "llama_cpp_python-0.3.36.tar.gz",
                                 "--no-build-isolation"])
    assert result.exit_code == 0
    assert result.output.splitlines()[-1].endswith(
        "--no-build-isolation llama_cpp_python-0.3.36.tar.gz")
    bad = runner.invoke(cli, ["backend", "install", "--preset", "rocm", "--dry-run"])
    assert bad.exit_code == 1 and "unknown preset 'rocm'" in bad.output and "cuda-sm90" in bad.output


def test_preflight_refuses_a_cuda_build_without_nvcc(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc anywhere
    monkeypatch.delenv("CUDACXX", raising=False)
    errors, _ = preflight(load_presets()["cuda"])
    assert errors and "nvcc is not on PATH" in errors[0]
    assert preflight(load_presets()["cpu"]) == ([], [])


def test_preflight_refuses_a_preset_for_another_system():
    errors, _ = preflight(load_presets()["metal"])
    assert errors and "does not apply" in errors[0]


@pytest.mark.skipif(not shutil.which("nvcc") and not os.environ.get("CUDACXX"),
                    reason="no CUDA toolkit on this machine")
def test_preflight_passes_where_nvcc_is_installed():
    errors, _ = preflight(load_presets()["cuda-sm90"])
    assert errors == []


def test_build_log_diagnosis_names_the_known_causes():
    log = ("-- Could not find nvcc, please set CUDAToolkit_ROOT.\n"
           "CMake Error: No CMAKE_CUDA_COMPILER could be found.\n"
           "#error -- unsupported GNU version! gcc versions later than 13 are not supported!\n")
    causes = diagnose(log)
    assert any("nvcc is not on PATH" in c for c in causes)
    assert any("host compiler is newer" in c for c in causes)
    assert diagnose("[12/40] Building CXX object ggml.cpp.o\n") == ()


def test_a_gpu_preset_that_built_a_cpu_library_is_a_failure(tmp_path: Path):
    log = tmp_path / "build.log"
    bad = verdict(load_presets()["cuda"], log, False, "-- CUDA Toolkit not found\n")
    assert not bad.ok and bad.causes[0].startswith("CPU fallback detected")
    assert verdict(load_presets()["cuda"], log, True, "").ok
    assert verdict(load_presets()["cpu"], log, False, "").ok
    lost = verdict(load_presets()["cpu-portable"], log, False, "", cpu_backend=False)
    assert not lost.ok and lost.causes[0].startswith("no CPU backend")
    assert verdict(load_presets()["cpu-portable"], log, False, "", cpu_backend=True).ok
    # this machine's own build, asked in a fresh interpreter
    assert supports_gpu_offload() is bool(__import__("llama_cpp").llama_supports_gpu_offload())
    assert loads_cpu_backend()  # whichever build this is, it runs on this CPU


def test_a_failed_build_points_at_its_log(tmp_path: Path):
    """pip fails at once on a missing source: nothing is built or reinstalled."""
    log = tmp_path / "build.log"
    result = CliRunner().invoke(cli, ["backend", "install", "--preset", "cpu", "--source",
                                      str(tmp_path / "missing.tar.gz"), "--log", str(log)])
    assert result.exit_code == 1
    assert f"build failed; see {log}" in result.output
    text = log.read_text()
    assert text.startswith("$ ") and "--force-reinstall" in text and "missing.tar.gz" in text


def test_backends_are_loaded_once_and_the_cpu_is_one_of_them():
    """A cpu-portable build registers no backend until ggufllm loads its modules from
    llama_cpp/lib; on a build with them compiled in the loader changes nothing."""
    from ggufllm.gpu.devices import backends
    from ggufllm.native.backends import load_backends
    from ggufllm.native.runtime import ensure_backend

    ensure_backend()
    before = backends()
    assert "CPU" in before
    assert load_backends() == len(before) and backends() == before
