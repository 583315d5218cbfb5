"""What a load will allocate, per device, before loading: our own arithmetic.

llama.cpp's own fit (``llama_params_fit``) is not in the bundled library's public
API and a ``no_alloc`` load reports zero sizes, so the figures come from:

- **weights**: the GGUF's tensor sizes (header only), per layer, experts apart.
  llama.cpp keeps ``token_embd`` on the CPU always, offloads the *last*
  ``n_gpu_layers`` blocks (the output layer counts as one), and a model with tied
  embeddings gets a copy of ``token_embd`` as its output matrix on that device.
  On x86 CPUs with AVX2 the CPU backend keeps a second, repacked copy of
  Q4_0/Q4_K/IQ4_NL/MXFP4 matrices whose row count is a multiple of 8
  (``CPU_REPACK``; Q2_K with AVX-512): counted in the host figure.
- **KV cache**: per layer, K and V rows of ``head_count_kv x key/value_length``
  for every cell. Full-attention layers hold the whole pool (``n_ctx x n_parallel``
  cells, padded to 256); sliding-window layers hold the same pool when
  ``swa_full`` (the default: prefixes stay reusable), else
  ``n_swa x n_parallel + n_ubatch`` cells, padded to 256.
- **compute buffers**: a measured allowance. The peak of llama.cpp's graph is the
  output projection, ``n_ubatch x n_vocab`` F32 logits, plus a per-token term
  ``k x n_embd`` bytes measured per architecture on the CPU backend
  (:data:`COMPUTE_PER_TOKEN_EMBD`); without flash attention the layer phase
  (``n_head x cells`` F32 scores per token) can exceed it, and the larger is taken.

Every figure is checked against llama.cpp's load log on the CPU build by
``tests/test_gpu_estimate.py`` (within 10%); GPU figures are the same arithmetic,
not yet measured on a GPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from gguf import GGMLQuantizationType as Q

from ..gguf_file import GGUFSummary, TensorInfo, read_gguf_header
from ..kvlayout import KV_TYPES, KVLayout, kv_cells

__all__ = ["COMPUTE_PER_TOKEN_EMBD", "EXPERT_PATTERN", "LayerMemory",
           "MemoryEstimate", "estimate_memory", "is_expert"]

MiB = 1024 * 1024
# llama.cpp's --n-cpu-moe pattern (common/arg.cpp), without the layer prefix
EXPERT_PATTERN = r"ffn_(up|down|gate|gate_up)_(ch|)exps"
_EXPERT_RE = re.compile(EXPERT_PATTERN)
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
# Compute-buffer bytes per token of the micro-batch beyond the logits, as a multiple of
# n_embd. Measured on the CPU backend (llama.cpp's "compute buffer size" log line):
# gemma3 270M: 514.50 MiB at n_ubatch 512 = 512 MiB of logits + 8.0 x 640 x 512;
# tiny gpt-oss (n_embd 64): 393.13 MiB = 392.75 MiB + 12.2 x 64 x 512.
COMPUTE_PER_TOKEN_EMBD = {"gemma3": 8, "gpt-oss": 12}
_DEFAULT_PER_TOKEN_EMBD = 16
# CPU repacking (ggml-cpu/repack.cpp, x86): type -> CPU feature it needs
_REPACKED = {Q.Q4_0: "AVX2", Q.Q4_K: "AVX2", Q.IQ4_NL: "AVX2", Q.MXFP4: "AVX2", Q.Q2_K: "AVX512"}


def is_expert(name: str) -> bool:
    """Whether a tensor is an MoE expert tensor (what ``cpu_moe`` keeps on the CPU)."""
    return _EXPERT_RE.search(name) is not None


@dataclass(frozen=True)
class LayerMemory:
    """One transformer block: where it goes and what it costs (bytes)."""

    index: int
    dense_bytes: int  # attention, norms, router, biases: everything but the experts
    expert_bytes: int
    kv_bytes: int
    sliding_window: bool
    on_gpu: bool
    experts_on_gpu: bool


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a load will allocate, host (RAM) and device (GPU) apart.

    ``host_weights`` includes ``host_repack`` (second copies the CPU backend makes).
    """

    host_weights: int
    device_weights: int
    host_kv: int
    device_kv: int
    host_compute: int
    device_compute: int
    host_repack: int
    output_bytes: int  # the logits buffer llama.cpp keeps in host memory
    kv_cells: int
    kv_cells_swa: int
    n_gpu_layers: int
    n_cpu_moe: int
    layers: tuple[LayerMemory, ...]

    @property
    def host_total(self) -> int:
        return self.host_weights + self.host_kv + self.host_compute + self.output_bytes

    @property
    def device_total(self) -> int:
        return self.device_weights + self.device_kv + self.device_compute

    @property
    def expert_bytes(self) -> int:
        return sum(layer.expert_bytes for layer in self.layers)

    def layer_map(self) -> list[str]:
        """Where each block goes, as runs of layers (``"0-11: CPU"``, ``"12-23: GPU, experts CPU"``)."""
        def where(layer: LayerMemory) -> str:
            if not layer.on_gpu:
                return "CPU"
            if layer.expert_bytes and not layer.experts_on_gpu:
                return "GPU, experts CPU"
            return "GPU"

        runs: list[tuple[int, int, str]] = []
        for layer in self.layers:
            w = where(layer)
            if runs and runs[-1][2] == w:
                runs[-1] = (runs[-1][0], layer.index, w)
            else:
                runs.append((layer.index, layer.index, w))
        out = [f"{a}-{b}: {w}" if a != b else f"{a}: {w}" for a, b, w in runs]
        return out + [f"output: {'GPU' if self.n_gpu_layers > 0 else 'CPU'}"]

    def as_dict(self) -> dict[str, Any]:
        """Figures in MiB, for ``doctor --json`` and logs."""
        mib = lambda n: round(n / MiB, 2)  # noqa: E731
        return {
            "host_mib": {"weights": mib(self.host_weights), "repack": mib(self.host_repack),
                         "kv": mib(self.host_kv), "compute": mib(self.host_compute),
                         "output": mib(self.output_bytes), "total": mib(self.host_total)},
            "device_mib": {"weights": mib(self.device_weights), "kv": mib(self.device_kv),
                           "compute": mib(self.device_compute), "total": mib(self.device_total)},
            "kv_cells": self.kv_cells, "kv_cells_swa": self.kv_cells_swa,
            "n_gpu_layers": self.n_gpu_layers, "n_cpu_moe": self.n_cpu_moe,
            "layers": self.layer_map(),
            "layers_on_gpu": sum(layer.on_gpu for layer in self.layers),
            "layers_with_experts_on_cpu": sum(layer.on_gpu and not layer.experts_on_gpu
                                              and layer.expert_bytes > 0
                                              for layer in self.layers),
        }


@dataclass(frozen=True)
class _Hparams:
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    kv: KVLayout  # the KV cache's per-layer widths and window layers


def _hparams(summary: GGUFSummary) -> _Hparams:
    meta, arch = summary.metadata, summary.architecture
    key = lambda k, default=None: meta.get(f"{arch}.{k}", default)  # noqa: E731
    n_layer = int(key("block_count", 0))
    n_embd = int(key("embedding_length", 0))
    n_head = int(key("attention.head_count", 1) or 1)
    n_vocab = summary.array_lengths.get("tokenizer.ggml.tokens") or int(key("vocab_size", 0))
    return _Hparams(arch, n_layer, n_embd, int(n_vocab), n_head, KVLayout.from_gguf(summary))


def _tensor_layer(t: TensorInfo, n_layer: int) -> int | None:
    """Layer index; ``n_layer`` for the output layer; None for the input (always CPU)."""
    m = _LAYER_RE.match(t.name)
    if m:
        return int(m.group(1))
    if t.name.startswith("output"):
        return n_layer
    return None


def _repack_extra(t: TensorInfo, features: frozenset[str]) -> int:
    """Bytes of the second copy the CPU backend makes of this CPU-resident tensor."""
    need = _REPACKED.get(t.ggml_type)
    if need is None or need not in features or "REPACK" not in features:
        return 0
    if t.name.startswith("token_embd") or len(t.shape) < 2 or t.shape[1] % 8:
        return 0
    return t.n_bytes


def _cpu_features() -> frozenset[str]:
    from .devices import cpu_features

    return cpu_features()


def _compute_bytes(hp: _Hparams, n_ubatch: int, cells: int, flash_attn: bool) -> int:
    per_embd = COMPUTE_PER_TOKEN_EMBD.get(hp.arch, _DEFAULT_PER_TOKEN_EMBD)
    output_phase = n_ubatch * (4 * hp.n_vocab + per_embd * hp.n_embd)
    layer_phase = 0 if flash_attn else n_ubatch * (4 * hp.n_head * cells + per_embd * hp.n_embd)
    return max(output_phase, layer_phase)


def estimate_memory(model_path: str | os.PathLike[str] | GGUFSummary, *, n_ctx: int = 4096,
                    n_parallel: int = 1, kv_tokens: int | None = None, n_gpu_layers: int = 0,
                    n_cpu_moe: int = 0, cpu_moe: bool = False, kv_cache_type: str = "f16",
                    swa_full: bool = True, kv_unified: bool = True, n_ubatch: int = 512,
                    flash_attn: bool = True,
                    cpu_features: frozenset[str] | None = None) -> MemoryEstimate:
    """Predicts the bytes a load allocates on the host and on the (first) GPU.

    Args:
        model_path: a GGUF file (only its header is read) or its parsed header.
        n_ctx: context window of one sequence.
        n_parallel: sequences decoded together; the KV pool is ``n_ctx x n_parallel``.
        kv_tokens: the KV pool size in cells, when set explicitly.
        n_gpu_layers: layers offloaded (-1 = all; the output layer counts as one).
        n_cpu_moe: keep the expert tensors of the first N layers on the CPU.
        cpu_moe: keep every expert tensor on the CPU.
        kv_cache_type: ``f16``, ``q8_0``, ``q4_0``...
        swa_full: sliding-window layers keep the whole pool (llama.cpp's default).
        kv_unified: one pool shared by all sequences; False gives each sequence its
            own stream of ``pool / n_parallel`` cells.
        n_ubatch: physical batch size (the compute buffers scale with it).
        flash_attn: whether flash attention is used (it is on the CPU and CUDA by default).
        cpu_features: CPU features for the repack term; None asks the bundled ggml.

    Returns:
        The estimate, per layer and per kind.

    Raises:
        ModelLoadError: the file is not a readable GGUF.
        ValueError: an unknown ``kv_cache_type``.
    """
    summary = model_path if isinstance(model_path, GGUFSummary) else read_gguf_header(model_path, probe=False)
    if kv_cache_type not in KV_TYPES:
        raise ValueError(f"unknown KV cache type {kv_cache_type!r}; known: {sorted(KV_TYPES)}")
    hp = _hparams(summary)
    features = _cpu_features() if cpu_features is None else cpu_features
    n_gpu = hp.n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, hp.n_layer + 1)
    gpu_start = hp.n_layer + 1 - n_gpu  # layers from here on (and the output) go to the GPU
    n_cpu_moe = hp.n_layer if cpu_moe else min(n_cpu_moe, hp.n_layer)
    cells, cells_swa = kv_cells(kv_tokens or n_ctx * n_parallel, n_seq=max(1, n_parallel),
                                n_swa=hp.kv.n_swa, swa_full=swa_full, unified=kv_unified,
                                n_ubatch=n_ubatch)

    dense = [0] * (hp.n_layer + 1)
    experts = [0] * (hp.n_layer + 1)
    host = repack = 0
    for t in summary.tensors:
        layer = _tensor_layer(t, hp.n_layer)
        if layer is None or layer >= len(dense):
            host += t.n_bytes + _repack_extra(t, features)
            repack += _repack_extra(t, features)
            continue
        expert = is_expert(t.name)
        (experts if expert else dense)[layer] += t.n_bytes
        if expert and layer < n_cpu_moe:  # overridden to the plain CPU buffer: not repacked
            host += t.n_bytes
        elif layer < gpu_start:
            host += t.n_bytes + _repack_extra(t, features)
            repack += _repack_extra(t, features)
    has_output = any(t.name == "output.weight" for t in summary.tensors)
    device = _device_weights(dense, experts, gpu_start, n_cpu_moe, hp.n_layer)
    if not has_output and n_gpu > 0:  # tied embeddings: the output copy lives on the GPU
        device += sum(t.n_bytes for t in summary.tensors if t.name == "token_embd.weight")

    layers, host_kv, device_kv = [], 0, 0
    for i in range(hp.n_layer):
        swa = hp.kv.swa[i]
        kv = hp.kv.layer_bytes(i, cells_swa if swa else cells, kv_cache_type)
        on_gpu = i >= gpu_start
        host_kv, device_kv = host_kv + (0 if on_gpu else kv), device_kv + (kv if on_gpu else 0)
        layers.append(LayerMemory(i, dense[i], experts[i], kv, swa, on_gpu,
                                  on_gpu and i >= n_cpu_moe))
    compute = _compute_bytes(hp, n_ubatch, cells, flash_attn)
    if n_gpu == 0:
        host_compute, device_compute = compute, 0
    else:  # the graph runs on the GPU; the host keeps the input embeddings' share
        small = n_ubatch * hp.n_embd * 8
        host_compute = small if gpu_start == 0 and n_cpu_moe == 0 else compute
        device_compute = compute
    return MemoryEstimate(
        host_weights=host, device_weights=device, host_kv=host_kv, device_kv=device_kv,
        host_compute=host_compute, device_compute=device_compute, host_repack=repack,
        output_bytes=max(1, n_parallel) * hp.n_vocab * 4, kv_cells=cells, kv_cells_swa=cells_swa,
        n_gpu_layers=n_gpu, n_cpu_moe=n_cpu_moe, layers=tuple(layers))


def _device_weights(dense: list[int], experts: list[int], gpu_start: int, n_cpu_moe: int,
                    n_layer: int) -> int:
    """Weights on the GPU: offloaded layers' dense tensors, and their experts past n_cpu_moe."""
    total = 0
    for i in range(max(gpu_start, 0), n_layer + 1):
        total += dense[i]
        if i >= n_cpu_moe or i == n_layer:
            total += experts[i]
    return total
