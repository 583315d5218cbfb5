"""``LLMService.get_model_info()``: facts about the model, the device, the KV cache and the
scheduler, gathered from the engine and the GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .engine import Engine
from .errors import ServiceClosedError
from .gpu import gpu_info
from .gpu.placement import LoadReport
from .resolve import ResolvedModel

__all__ = ["model_info"]


def model_info(max_length: int, engine: Engine | None, resolved: ResolvedModel | None,
               load_report: LoadReport | None) -> dict[str, Any]:
    """What :meth:`ggufllm.LLMService.get_model_info` returns (see there)."""
    gpu = gpu_info()
    info: dict[str, Any] = {
        "loaded": engine is not None,
        "model_name": None, "model_path": None, "architecture": None,
        "quantization": None, "n_ctx": max_length,
        "n_gpu_layers": 0,
        "device": gpu.device, "gpu_name": gpu.name,
        "gpu_memory_total": gpu.memory_total_gb,
        "gpu_memory_allocated": gpu.memory_used_gb,
    }
    if engine is not None and load_report is not None:  # as llama.cpp reported it
        info.update(load_report.as_info())
    if engine is not None:
        kernels = engine.kernel_verdict.as_info()
        if load_report is not None:  # the CPU buffer types the weights went to
            kernels["buffers_in_use"] = sorted(b for b in load_report.model_buffers
                                               if b.startswith(("CPU", "AMX")))
        info["cpu_extra_buffers"] = kernels
    if engine is not None and resolved is not None:
        meta = engine.summary.metadata
        file_type = meta.get("general.file_type")
        info.update(
            model_name=meta.get("general.name") or resolved.path.stem,
            model_path=str(resolved.path), architecture=engine.summary.architecture,
            quantization=_quantization_name(resolved.path, file_type),
            n_ctx=engine.n_ctx, prompt_format=engine.prompt_kind.value,
            source=resolved.source,
        )
        try:
            facts = engine.model_facts()
            info.update(n_params=facts["n_params"],
                        model_size_gb=round(facts["size_bytes"] / 1e9, 3),
                        kv_cache=engine.kv_cache_info(), scheduler=engine.scheduler.counts())
        except ServiceClosedError:  # closed meanwhile by another thread
            info["loaded"] = False
    return info


def _quantization_name(path: Path, file_type: Any) -> str:
    """The file's own word on its quantization (``general.file_type``), else the type
    holding most tensor bytes; never the file name, which a rename can make lie."""
    from gguf import LlamaFileType

    if file_type is not None:
        try:
            name = LlamaFileType(int(file_type)).name
        except (TypeError, ValueError):
            return f"file_type {file_type}"
        return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
    from .gguf_file import read_gguf_header

    table = read_gguf_header(path, probe=False).type_table()  # largest first
    return table[0][0] if table else "unknown"
