"""Per-tensor fidelity of a converted GGUF against its source checkpoint.

Each GGUF tensor is dequantized with gguf-py's reference dequantizers (an
implementation independent of the one that wrote it) and compared with the
source values; MXFP4 experts must match the checkpoint's codes bit for bit.
Streams one tensor at a time.

A tensor passes when its relative RMS error stays under its type's bound
(:data:`ERROR_BOUNDS`), derived from the format: a float type rounds each value
within its unit roundoff (2^-24 F32, 2^-11 F16, 2^-8 BF16); a b-bit block type
rounds to a step of absmax / (2^(b-1) - 1), i.e. an RMS noise of step / sqrt(12),
and the absmax of a 32-value block of Gaussian weights is about 2.5 sigma. Each
bound is that estimate times a margin of 2 (on the tiny fixture the worst tensors
measure Q8_0 5.5e-3 against 1.1e-2, Q5_0 4.3e-2 against 9.6e-2, Q4_K 7.1e-2
against 0.21; F16/BF16/F32 from BF16 sources are exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from ggufllm.errors import ConversionError
from ggufllm.gguf_file import read_gguf_header, tensor_array

from .converter import load_plan

__all__ = ["ERROR_BOUNDS", "TensorReport", "verify"]

_MARGIN = 2.0


def _block_bound(bits: int) -> float:
    return _MARGIN * 2.5 / ((2 ** (bits - 1) - 1) * math.sqrt(12))


# relative RMS error allowed per stored type (see the module docstring)
ERROR_BOUNDS: dict[Q, float] = {
    Q.F32: _MARGIN * 2.0**-24, Q.F16: _MARGIN * 2.0**-11, Q.BF16: _MARGIN * 2.0**-8,
    Q.MXFP4: 0.0,  # the checkpoint's own codes: exact
    Q.Q8_0: _block_bound(8), Q.Q6_K: _block_bound(6),
    Q.Q5_0: _block_bound(5), Q.Q5_1: _block_bound(5), Q.Q5_K: _block_bound(5),
    Q.Q4_0: _block_bound(4), Q.Q4_1: _block_bound(4), Q.Q4_K: _block_bound(4),
    Q.IQ4_NL: _block_bound(4),
}


@dataclass(frozen=True)
class TensorReport:
    """One tensor's fidelity against the source."""

    name: str
    qtype: str
    rel_error: float  # ||gguf - source|| / ||source||
    max_abs_error: float
    bit_exact: bool | None  # MXFP4 only: the codes and scales are the checkpoint's
    bound: float  # the largest rel_error its type allows (ERROR_BOUNDS)

    @property
    def ok(self) -> bool:
        """Bit-exact where that is required, and within the type's error bound
        (False for a NaN error)."""
        return self.bit_exact is not False and self.rel_error <= self.bound


def verify(gguf_path: str | Path, reference: str | Path,
           progress: Callable[[str], None] | None = None) -> Iterator[TensorReport]:
    """Yields one report per tensor of ``gguf_path``.

    Raises:
        ConversionError: the GGUF lacks a tensor of the plan or has one of another shape.
    """
    summary = read_gguf_header(gguf_path, probe=False)
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
        yield TensorReport(job.name, qtype.name, rel, float(np.abs(diff).max(initial=0.0)), exact,
                           ERROR_BOUNDS.get(qtype, 0.0))
        if progress is not None:
            progress(job.name)
