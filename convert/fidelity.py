"""Per-tensor fidelity of a converted GGUF against its source checkpoint.

Each GGUF tensor is dequantized with gguf-py's reference dequantizers (an
implementation independent of the one that wrote it) and compared with the
source values; MXFP4 experts must match the checkpoint's codes bit for bit.
Streams one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from ggufllm.errors import ConversionError
from ggufllm.gguf_file import read_gguf_header, tensor_array

from .converter import load_plan

__all__ = ["TensorReport", "verify"]


@dataclass(frozen=True)
class TensorReport:
    name: str
    qtype: str
    rel_error: float  # ||gguf - source|| / ||source||
    max_abs_error: float
    bit_exact: bool | None  # MXFP4 only: the codes and scales are the checkpoint's

    @property
    def ok(self) -> bool:
        return self.bit_exact is not False


def verify(gguf_path: str | Path, reference: str | Path,
           progress: Callable[[str], None] | None = None) -> Iterator[TensorReport]:
    """Yields one report per tensor of ``gguf_path``.

    Raises:
        ConversionError: the GGUF lacks a tensor of the plan or has one of another shape.
    """
    summary = read_gguf_header(gguf_path)
    tensors = {t.name: t for t in summary.tensors}
    experts = str(summary.metadata.get("ggufllm.experts", "mxfp4"))
    _, _, jobs = load_plan(reference, "f32", experts)
    missing = [j.name for j in jobs if j.name not in tensors]
    if missing:
        raise ConversionError([f"{gguf_path} has no tensor {n}" for n in missing])
    for job in jobs:
        t = tensors[job.name]
        qtype = t.ggml_type
        raw = np.asarray(tensor_array(summary, t))
        ref = job.reference()
        if qtype is Q.MXFP4:
            exact = bool(np.array_equal(raw.reshape(-1), job.produce().reshape(-1)))
            got = dequantize(raw, qtype)
        else:
            exact = None
            got = raw if qtype in (Q.F32, Q.F16) else dequantize(raw, qtype)
        got = np.asarray(got, dtype=np.float32).reshape(job.shape)
        if got.shape != ref.shape:
            raise ConversionError(f"{job.name}: shape {got.shape}, source {ref.shape}")
        diff = got.astype(np.float64) - ref
        norm = float(np.linalg.norm(ref.astype(np.float64)))
        rel = float(np.linalg.norm(diff)) / norm if norm else float(np.linalg.norm(diff))
        yield TensorReport(job.name, qtype.name, rel, float(np.abs(diff).max(initial=0.0)), exact)
        if progress is not None:
            progress(job.name)
