"""Tensor encodings: MXFP4 repacking, and quantization by llama.cpp's own kernels.

K-quants and Q8_0/Q5_0/... are made by ``ggml_quantize_chunk`` from the
``libggml-base`` that llama-cpp-python bundles, so a tensor we write is
byte-for-byte what llama.cpp's quantizer would write from the same floats.
"""

from __future__ import annotations

import ctypes
import enum
from pathlib import Path
from typing import Protocol

import numpy as np
from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as Q

__all__ = ["OutType", "ExpertType", "mxfp4_from_hf", "mxfp4_to_float", "encode",
           "q4_k_m_type", "FILE_TYPES"]


class SourceTensorLike(Protocol):
    shape: tuple[int, ...]

    def float32(self, rows: slice | None = None) -> np.ndarray: ...


class OutType(str, enum.Enum):
    """What ``--type`` asks for: the encoding of the non-expert matrices."""

    Q8_0 = "q8_0"
    Q4_K_M = "q4_k_m"
    BF16 = "bf16"
    F16 = "f16"
    F32 = "f32"


class ExpertType(str, enum.Enum):
    """What ``--experts`` asks for (MXFP4 keeps the checkpoint's codes bit for bit)."""

    MXFP4 = "mxfp4"
    Q8_0 = "q8_0"
    BF16 = "bf16"
    F16 = "f16"
    F32 = "f32"


# general.file_type written for each --type (MXFP4 experts with Q8_0 elsewhere is
# what llama.cpp calls MOSTLY_MXFP4_MOE when it quantizes such a model itself).
FILE_TYPES: dict[OutType, LlamaFileType] = {
    OutType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    OutType.Q4_K_M: LlamaFileType.MOSTLY_Q4_K_M,
    OutType.BF16: LlamaFileType.MOSTLY_BF16,
    OutType.F16: LlamaFileType.MOSTLY_F16,
    OutType.F32: LlamaFileType.ALL_F32,
}

_SIMPLE = {OutType.Q8_0: Q.Q8_0, OutType.BF16: Q.BF16, OutType.F16: Q.F16, OutType.F32: Q.F32}
_EXPERT = {ExpertType.MXFP4: Q.MXFP4, ExpertType.Q8_0: Q.Q8_0, ExpertType.BF16: Q.BF16,
           ExpertType.F16: Q.F16, ExpertType.F32: Q.F32}
# llama.cpp's fallbacks for rows that are not a multiple of the 256-wide K-quant super-block
_K_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.Q3_K: Q.IQ4_NL,
               Q.Q2_K: Q.IQ4_NL}
QK_K = 256

# E2M1 values of the 16 FP4 codes (OCP MX specification)
_FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                 -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


def expert_type(experts: ExpertType) -> Q:
    return _EXPERT[experts]


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp gives more bits to the first and last eighth of the layers and
    # to every third layer between them.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fit(qtype: Q, n_per_row: int) -> Q:
    if qtype in _K_FALLBACK and n_per_row % QK_K:
        return _K_FALLBACK[qtype]
    return qtype


def q4_k_m_type(name: str, n_per_row: int, layer: int | None, n_layers: int) -> Q:
    """llama.cpp's Q4_K_M choice for one 2-D non-expert matrix (with its fallbacks)."""
    if name == "output.weight":
        return _fit(Q.Q6_K, n_per_row)
    if name.endswith("attn_v.weight") and layer is not None and _use_more_bits(layer, n_layers):
        return _fit(Q.Q6_K, n_per_row)
    if name.endswith("ffn_down.weight") and layer is not None and _use_more_bits(layer, n_layers):
        return _fit(Q.Q6_K, n_per_row)
    return _fit(Q.Q4_K, n_per_row)


def matrix_type(out: OutType, name: str, n_per_row: int, layer: int | None, n_layers: int) -> Q:
    """The encoding of a 2-D non-expert matrix for ``--type out``."""
    if out is OutType.Q4_K_M:
        return q4_k_m_type(name, n_per_row, layer, n_layers)
    return _fit(_SIMPLE[out], n_per_row)


# -- MXFP4 -------------------------------------------------------------------

def mxfp4_from_hf(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Repacks HF MXFP4 (``blocks [..., n, 16]`` + ``scales [..., n]``) as GGML MXFP4 bytes.

    Both hold the same 4-bit codes and E8M0 scales; HF packs elements 2j and
    2j+1 in byte j (low nibble first), GGML packs j and j+16, after the scale
    byte of each 17-byte block. Returns ``[..., n * 17]`` uint8.
    """
    lo, hi = blocks & 0x0F, blocks >> 4
    codes = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    out = np.concatenate([scales[..., None], qs], axis=-1)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 17)


def mxfp4_hf_to_float(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Dequantizes HF MXFP4 to float32 ``[..., n * 32]`` (the reference values)."""
    lo, hi = blocks & 0x0F, blocks >> 4
    codes = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    scale = np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127).astype(np.float32)
    values = _FP4[codes] * scale[..., None]
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def mxfp4_to_float(data: np.ndarray) -> np.ndarray:
    """Dequantizes GGML MXFP4 bytes ``[..., n * 17]`` to float32 ``[..., n * 32]``."""
    blocks = data.reshape(*data.shape[:-1], data.shape[-1] // 17, 17)
    scales, qs = blocks[..., 0], blocks[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    scale = np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127).astype(np.float32)
    return (_FP4[codes] * scale[..., None]).reshape(*data.shape[:-1], -1)


# -- llama.cpp's quantizer -----------------------------------------------------

_ggml: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _ggml
    if _ggml is None:
        import llama_cpp

        path = next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_void_p]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        _ggml = lib
    return _ggml


def n_bytes(qtype: Q, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * size


def byte_shape(qtype: Q, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The numpy shape of a tensor's bytes (the row becomes its encoded size)."""
    block, size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size)


# Rows converted to float32 at a time when encoding a large matrix: bounds the
# float copy (the 201088 x 2880 embedding would otherwise take 2.3 GB).
CHUNK_ELEMENTS = 1 << 24


def encode_rows(source: SourceTensorLike, qtype: Q) -> np.ndarray:
    """Encodes a 2-D source matrix chunk by chunk of rows (same bytes as :func:`encode`)."""
    rows, cols = source.shape
    if qtype in (Q.F32, Q.F16) or rows * cols <= CHUNK_ELEMENTS:
        return encode(source.float32(), qtype)
    step = max(1, CHUNK_ELEMENTS // cols)
    parts = [encode(source.float32(slice(r, r + step)), qtype) for r in range(0, rows, step)]
    return np.concatenate(parts, axis=0)


def encode(values: np.ndarray, qtype: Q) -> np.ndarray:
    """Encodes float32 ``values`` (rows along the last axis) as ``qtype``.

    Returns the float array for F32/F16/BF16 and uint8 bytes for quantized types.
    """
    if qtype is Q.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype is Q.F16:
        return values.astype(np.float16)
    if qtype is Q.BF16:
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        # round to nearest even, as ggml's fp32 -> bf16 does (no NaN in weights)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype(np.uint16)
    src = np.ascontiguousarray(values, dtype=np.float32)
    n_per_row = src.shape[-1]
    n_rows = src.size // n_per_row
    out = np.empty(byte_shape(qtype, src.shape), dtype=np.uint8)
    lib = _lib()
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, out.ctypes.data, 0, n_rows,
                                      n_per_row, None)
    assert written == out.nbytes, (written, out.nbytes)
    return out
