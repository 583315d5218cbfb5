#!/usr/bin/env bash
# Makes what benchmarks/gpu_check.sh needs on a GPU machine without network (< 20 MB):
#   .gpu_bundle/llama_cpp_python-0.3.36-trimmed.tar.gz  the sdist without models, docs,
#       examples, tests, benches and the server's web UI (76 MB -> ~10 MB)
#   .gpu_bundle/wheels/  ggufllm's pure-Python dependencies missing from the GPU image
#       (its Python is 3.12; it has numpy, click, jinja2, scikit-build-core, cmake, ninja)
# .gpu_bundle/ is git-ignored: carry it to the device (it is never committed).
#
#   benchmarks/make_gpu_bundle.sh [SDIST.tar.gz]   # default: pip download of llama-cpp-python==0.3.36
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="$ROOT/.gpu_bundle"
VERSION=0.3.36
PY="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUTDIR/wheels"
SDIST="${1:-}"
if [ -z "$SDIST" ]; then
  "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TMP/dl"
  SDIST="$(ls "$TMP"/dl/llama_cpp_python-*.tar.gz)"
fi
tar -xzf "$SDIST" -C "$TMP"
SRC="$TMP/llama_cpp_python-$VERSION"
V="$SRC/vendor/llama.cpp"
# what a CUDA build of the library (and mtmd) never reads
rm -rf "$V"/{models,docs,examples,tests,benches,media,gguf-py,conversion,scripts,pocs,app,ci,grammars,requirements} \
       "$V"/tools/ui "$V"/tools/server/public* "$V"/tools/server/webui \
       "$SRC"/{docs,examples,tests,docker,.github}
# the sdist carries its git history (~40 MB), which no build needs
rm -rf "$SRC/.git"
# other GPU backends' sources: ggml adds a backend's folder only when it is switched on
for b in vulkan sycl opencl cann metal webgpu zdnn hexagon openvino kompute musa; do
  rm -rf "$V/ggml/src/ggml-$b"
done
# llama.cpp's CMakeLists adds these only when asked to; keep empty stubs where it checks
mkdir -p "$V/examples" "$V/tests"
tar -czf "$OUTDIR/llama_cpp_python-$VERSION-trimmed.tar.gz" -C "$TMP" "llama_cpp_python-$VERSION"
# pure-Python and cp312 wheels of what the GPU image lacks
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$OUTDIR/wheels" \
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0 \
  typing-inspection==0.4.5 python-dotenv==1.2.4 gguf==0.19.0 diskcache==5.6.3
du -sh "$OUTDIR"/* "$OUTDIR"
