"""Where the model goes: ``N_GPU_LAYERS=auto``, MoE experts kept on the CPU, and what llama.cpp did.

Auto placement, from :func:`~ggufllm.gpu.estimate.estimate_memory` and the first GPU's
free memory minus a margin (1 GiB, as llama.cpp's own fit keeps):

1. everything on the GPU, if it fits;
2. else the expert tensors of the first N layers on the CPU (``n_cpu_moe``, N as small
   as fits; N = all layers is ``cpu_moe``), since experts are most of a MoE model's
   bytes and only the top-k of them are read per token;
3. else, experts all on the CPU, whole layers too, from the first, until it fits.

A CPU build (or no GPU) resolves ``auto`` to 0 layers. Settings given by hand are used
as given. Expert tensors are kept on the CPU through ``llama_model_params.tensor_buft_overrides``
(a NULL-terminated array of ``{pattern, buffer type}``; llama-cpp-python leaves the field a
bare pointer), with llama.cpp's ``--n-cpu-moe`` patterns and ggml's CPU buffer type.

What was really placed is read back from llama.cpp's load log (:func:`observe_load`):
layers offloaded, each overridden tensor and its buffer type, buffer sizes per device.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from ..gguf_file import GGUFSummary, read_gguf_header
from .estimate import EXPERT_PATTERN, MemoryEstimate, estimate_memory, is_expert

__all__ = ["GPU_MARGIN_BYTES", "LoadReport", "Placement", "TensorOverrides", "expert_patterns",
           "observe_load", "placement_for_settings", "plan_placement", "settings_context"]

logger = logging.getLogger(__name__)
GPU_MARGIN_BYTES = 1 << 30
MiB = 1024 * 1024


def expert_patterns(cpu_moe: bool, n_cpu_moe: int) -> list[str]:
    """llama.cpp's ``--cpu-moe`` / ``--n-cpu-moe N`` regexes (``std::regex_search``ed)."""
    if cpu_moe:
        return [r"\." + EXPERT_PATTERN]
    return [rf"blk\.{i}\." + EXPERT_PATTERN for i in range(n_cpu_moe)]


class _Override(ctypes.Structure):
    # struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


class TensorOverrides:
    """A NULL-terminated ``llama_model_tensor_buft_override`` array that sends tensors to the CPU.

    Keep the object alive while llama.cpp loads: it owns the pattern strings.

    Args:
        patterns: regexes of the tensor names to keep in CPU memory.
    """

    def __init__(self, patterns: list[str]) -> None:
        from .devices import cpu_buffer_type

        self.patterns = list(patterns)
        self._strings = [p.encode() for p in self.patterns]
        buft = cpu_buffer_type()
        self._array = (_Override * (len(patterns) + 1))()
        for i, pattern in enumerate(self._strings):
            self._array[i].pattern = pattern
            self._array[i].buft = buft
        self._array[len(patterns)].pattern = None  # the terminator

    @property
    def address(self) -> int:
        """What goes into ``llama_model_params.tensor_buft_overrides``."""
        return ctypes.addressof(self._array)

    @classmethod
    def for_experts(cls, cpu_moe: bool, n_cpu_moe: int) -> TensorOverrides | None:
        """The overrides for ``cpu_moe`` / ``n_cpu_moe``; None when neither is set."""
        patterns = expert_patterns(cpu_moe, n_cpu_moe)
        return cls(patterns) if patterns else None


@dataclass(frozen=True)
class Placement:
    """What a load will ask llama.cpp for, and why."""

    n_gpu_layers: int
    cpu_moe: bool
    n_cpu_moe: int
    reason: str
    estimate: MemoryEstimate | None = None
    device: str | None = None
    free_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_gpu_layers": self.n_gpu_layers, "cpu_moe": self.cpu_moe,
                               "n_cpu_moe": self.n_cpu_moe, "reason": self.reason,
                               "device": self.device}
        if self.free_bytes is not None:
            out["device_free_mib"] = round(self.free_bytes / MiB, 1)
        if self.estimate is not None:
            out["estimate"] = self.estimate.as_dict()
        return out


def _first_gpu() -> tuple[str, int] | None:
    from .devices import gpu_devices

    try:
        gpus = gpu_devices()
    except OSError:
        return None
    return (gpus[0].name, gpus[0].free_bytes) if gpus else None


def plan_placement(model_path: str | os.PathLike[str] | GGUFSummary, *,
                   n_gpu_layers: int | Literal["auto"] = "auto", cpu_moe: bool = False,
                   n_cpu_moe: int = 0, free_bytes: int | None = None,
                   margin_bytes: int = GPU_MARGIN_BYTES, **kv: Any) -> Placement:
    """Resolves ``auto`` into layer and expert counts that fit the first GPU.

    Args:
        model_path: the GGUF file (header only) or its parsed header.
        n_gpu_layers: ``"auto"`` or a number given by hand (-1 = all), used as given.
        cpu_moe: keep every expert tensor on the CPU (by hand).
        n_cpu_moe: keep the experts of the first N layers on the CPU (by hand).
        free_bytes: the device's free memory; None asks ggml for the first GPU's
            (no GPU: 0 layers).
        margin_bytes: memory left free on the device.
        **kv: context arguments of :func:`estimate_memory` (``n_ctx``, ``n_parallel``,
            ``kv_tokens``, ``kv_cache_type``, ``swa_full``, ``n_ubatch``, ``flash_attn``).

    Returns:
        The placement, with the estimate it was chosen from.
    """
    summary = model_path if isinstance(model_path, GGUFSummary) else read_gguf_header(model_path)

    def est(layers: int, moe: int, all_moe: bool = False) -> MemoryEstimate:
        return estimate_memory(summary, n_gpu_layers=layers, n_cpu_moe=moe, cpu_moe=all_moe, **kv)

    device = None
    if free_bytes is None:
        gpu = _first_gpu()
        if gpu is None:
            why = "no GPU: everything on the CPU"
            if n_gpu_layers != "auto":
                why = f"N_GPU_LAYERS={n_gpu_layers} set by hand, but no GPU: everything on the CPU"
            return Placement(0 if n_gpu_layers == "auto" else int(n_gpu_layers), cpu_moe,
                             n_cpu_moe, why, est(0, n_cpu_moe, cpu_moe))
        device, free_bytes = gpu
    if n_gpu_layers != "auto":
        return Placement(int(n_gpu_layers), cpu_moe, n_cpu_moe, "set by hand",
                         est(int(n_gpu_layers), n_cpu_moe, cpu_moe), device, free_bytes)
    budget = free_bytes - margin_bytes
    n_layer = len(est(0, 0).layers)
    full = est(-1, n_cpu_moe, cpu_moe)
    if full.device_total <= budget:
        return Placement(-1, cpu_moe, n_cpu_moe, "everything fits on the GPU", full,
                         device, free_bytes)
    has_experts = any(is_expert(t.name) for t in summary.tensors)
    if has_experts and not cpu_moe:
        for moe in range(max(n_cpu_moe, 1), n_layer):
            e = est(-1, moe)
            if e.device_total <= budget:
                return Placement(-1, False, moe, f"experts of the first {moe} layers on the CPU",
                                 e, device, free_bytes)
        e = est(-1, n_layer, True)
        if e.device_total <= budget:
            return Placement(-1, True, n_layer, "all experts on the CPU", e, device, free_bytes)
    all_moe = has_experts
    for layers in range(n_layer, -1, -1):
        e = est(layers, n_layer if all_moe else 0, all_moe)
        if e.device_total <= budget or layers == 0:
            what = "all experts and " if all_moe else ""
            return Placement(layers, all_moe, n_layer if all_moe else 0,
                             f"{what}{n_layer + 1 - layers} of {n_layer + 1} layers on the CPU",
                             e, device, free_bytes)
    raise AssertionError("unreachable: 0 layers always fits")


def settings_context(settings: Any) -> dict[str, Any]:
    """The :func:`estimate_memory` context arguments that :class:`~ggufllm.config.Settings` describe."""
    return dict(n_ctx=settings.max_length, n_parallel=settings.n_parallel,
                kv_tokens=settings.kv_cache_tokens, kv_cache_type=settings.kv_cache_type,
                swa_full=settings.swa_full, n_ubatch=min(settings.n_batch, 512),
                flash_attn=settings.flash_attn is not False)


def placement_for_settings(settings: Any, model_path: str | os.PathLike[str]) -> Placement:
    """The placement a load with these :class:`~ggufllm.config.Settings` uses (``auto`` resolved).

    Raises:
        ModelLoadError: the file is not a readable GGUF.
    """
    placement = plan_placement(model_path, n_gpu_layers=settings.n_gpu_layers,
                               cpu_moe=settings.cpu_moe, n_cpu_moe=settings.n_cpu_moe,
                               **settings_context(settings))
    logger.info("placement: %s (n_gpu_layers=%d, cpu_moe=%s, n_cpu_moe=%d)", placement.reason,
                placement.n_gpu_layers, placement.cpu_moe, placement.n_cpu_moe)
    return placement


# -- what llama.cpp reports ------------------------------------------------------

_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_MODEL_BUF = re.compile(r"^load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")
_KV_BUF = re.compile(r"^llama_kv_cache:\s+(\S+) KV buffer size =\s+([\d.]+) MiB")
_COMPUTE_BUF = re.compile(r"^\w+:\s+(\S+) compute buffer size =\s+([\d.]+) MiB")
_OVERRIDE = re.compile(r"^tensor (\S+) \((\d+) MiB (\w+)\) buffer type overridden to (\S+)")
_LAYER_DEV = re.compile(r"layer\s+(\d+) assigned to device (\S+),")


def _add(table: dict[str, float], name: str, mib: str) -> None:
    table[name] = round(table.get(name, 0.0) + float(mib), 2)


@dataclass
class LoadReport:
    """What llama.cpp logged while loading a model and creating its context (MiB per buffer)."""

    layers_offloaded: int = 0
    layers_total: int | None = None
    layer_devices: dict[int, str] = field(default_factory=dict)
    model_buffers: dict[str, float] = field(default_factory=dict)
    kv_buffers: dict[str, float] = field(default_factory=dict)
    compute_buffers: dict[str, float] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)  # tensor -> buffer type

    def feed(self, line: str) -> None:
        """Reads one log line (lines that say nothing about placement are ignored)."""
        if m := _MODEL_BUF.match(line):
            _add(self.model_buffers, *m.groups())
        elif m := _KV_BUF.match(line):
            _add(self.kv_buffers, *m.groups())
        elif m := _COMPUTE_BUF.match(line):
            _add(self.compute_buffers, *m.groups())
        elif m := _OVERRIDE.match(line):
            self.overrides[m.group(1)] = m.group(4)
        elif m := _OFFLOADED.search(line):
            self.layers_offloaded, self.layers_total = int(m.group(1)), int(m.group(2))
        elif m := _LAYER_DEV.search(line):
            self.layer_devices[int(m.group(1))] = m.group(2)

    @staticmethod
    def _on_host(buffer: str) -> bool:
        return buffer.startswith("CPU") or buffer.endswith("_Host")

    def device_mib(self) -> float:
        """MiB llama.cpp allocated on GPUs (weights, KV cache, compute buffers)."""
        tables = (self.model_buffers, self.kv_buffers, self.compute_buffers)
        return round(sum(v for t in tables for k, v in t.items() if not self._on_host(k)), 2)

    def host_mib(self) -> float:
        """MiB llama.cpp allocated in host memory (mapped weights included)."""
        tables = (self.model_buffers, self.kv_buffers, self.compute_buffers)
        return round(sum(v for t in tables for k, v in t.items() if self._on_host(k)), 2)

    def as_info(self) -> dict[str, Any]:
        """The placement fields of ``get_model_info()``."""
        experts_cpu = sorted(n for n, b in self.overrides.items() if b.startswith("CPU"))
        return {
            "n_gpu_layers": self.layers_offloaded,
            "layers_on_gpu": sum(not d.startswith("CPU") for d in self.layer_devices.values()),
            "expert_tensors_on_cpu": len(experts_cpu),
            "gpu_memory_used_mib": self.device_mib(), "host_memory_used_mib": self.host_mib(),
            "buffers_mib": {"model": dict(self.model_buffers), "kv": dict(self.kv_buffers),
                            "compute": dict(self.compute_buffers)},
        }


@contextmanager
def observe_load() -> Iterator[LoadReport]:
    """Collects llama.cpp's load log (``ggufllm.llama_cpp`` logger) into a :class:`LoadReport`.

    The logger is lowered to DEBUG for the duration so that llama.cpp's info lines
    reach us; a filter passes on only what the logger's own level let through
    before, so nothing new reaches the user's handlers.
    """
    native = logging.getLogger("ggufllm.llama_cpp")
    threshold = native.getEffectiveLevel()
    report = LoadReport()

    def keep(record: logging.LogRecord) -> bool:
        report.feed(record.getMessage())
        return record.levelno >= threshold

    old_level = native.level
    native.addFilter(keep)
    native.setLevel(logging.DEBUG)
    try:
        yield report
    finally:
        native.removeFilter(keep)
        native.setLevel(old_level)
