#!/usr/bin/env bash
# Build llama-server, the peer that benchmarks/llama_server_peer.py measures `ggufllm serve` against,
# from the llama.cpp that llama-cpp-python 0.3.36 vendors: the same kernels our server runs on.
#
#   bash benchmarks/build_llama_server.sh
#
# The llama-cpp-python sdist is fetched from PyPI with pip into a cache folder outside the
# repository (once; its sha256 is checked), unpacked there, and only the `llama-server` target is
# built, for this CPU, with CMake (Ninja when installed, make otherwise). Takes 10-15 minutes on
# 2 cores. Everything goes under the scratch folder:
#
#   ${GGUFLLM_SCRATCH:-$HOME/.cache/ggufllm-scratch}/llama-server-src/   sdist and unpacked source
#   ${GGUFLLM_SCRATCH:-$HOME/.cache/ggufllm-scratch}/llama-server-build/ CMake build folder
#   ${GGUFLLM_SCRATCH:-$HOME/.cache/ggufllm-scratch}/llama-server-build/bin/llama-server  the binary
#
# The binary path is the last line printed; llama_server_peer.py looks there unless $LLAMA_SERVER
# names another binary. Environment: GGUFLLM_SCRATCH (the folder above), PYTHON (the interpreter
# whose pip downloads; python3 by default), JOBS (parallel compile jobs; all cores by default).
set -euo pipefail

VERSION=0.3.36
# From https://pypi.org/simple/llama-cpp-python/ for llama_cpp_python-0.3.36.tar.gz.
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

scratch=${GGUFLLM_SCRATCH:-$HOME/.cache/ggufllm-scratch}
src_root=$scratch/llama-server-src
sdist=$src_root/llama_cpp_python-$VERSION.tar.gz
source_dir=$src_root/llama_cpp_python-$VERSION/vendor/llama.cpp
build_dir=$scratch/llama-server-build
jobs=${JOBS:-$(nproc)}

if [ ! -f "$source_dir/CMakeLists.txt" ]; then
  mkdir -p "$src_root"
  if [ ! -f "$sdist" ]; then
    echo "downloading llama-cpp-python $VERSION (sdist, ~77 MB) into $src_root" >&2
    "${PYTHON:-python3}" -m pip download --quiet --no-deps --no-binary :all: \
      --dest "$src_root" "llama-cpp-python==$VERSION"
  fi
  echo "$SDIST_SHA256  $sdist" | sha256sum --check --quiet
  # Unpack beside the final place and rename, so an interrupted run never leaves a half tree
  # that the CMakeLists.txt check above would take for a complete one.
  partial=$(mktemp -d "$src_root/unpack.XXXXXX")
  tar -xzf "$sdist" -C "$partial"
  rm -rf "$src_root/llama_cpp_python-$VERSION"
  mv "$partial/llama_cpp_python-$VERSION" "$src_root/"
  rmdir "$partial"
fi

if command -v ninja >/dev/null 2>&1; then
  generator=Ninja
else
  generator="Unix Makefiles"
fi
# A build folder configured with the other generator cannot be reused: start it afresh.
if [ -f "$build_dir/CMakeCache.txt" ] &&
   ! grep -qx "CMAKE_GENERATOR:INTERNAL=$generator" "$build_dir/CMakeCache.txt"; then
  rm -rf "$build_dir"
fi

# CPU only, tuned for this machine (GGML_NATIVE is llama.cpp's default), statically linked so the
# binary runs from wherever it is copied; no curl/OpenSSL, since the benchmark serves a local file.
cmake -S "$source_dir" -B "$build_dir" -G "$generator" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build "$build_dir" --target llama-server --parallel "$jobs"

binary=$build_dir/bin/llama-server
test -x "$binary"
echo "$binary"
