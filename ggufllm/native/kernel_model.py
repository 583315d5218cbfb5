"""The kernel self-test's model: a tiny llama whose weights are blocks cut from the real file.

llama.cpp picks a CPU kernel (and an extra buffer type: the repacked layouts, AMX)
by a weight's type and by the operation: ``MUL_MAT`` for dense weights,
``MUL_MAT_ID`` for MoE experts. The tiny model has one layer per weight type of
the real model, every matrix of that layer in that type, and experts when the real
model has them, so the child decodes through the same kernels without loading
the real weights (gpt-oss is never loaded twice).

Its blocks are copied from the real tensors (the first 256 columns of each row):
real scales and real value ranges, for any type llama.cpp can read, including
those that cannot be quantized without an importance matrix.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from ..gguf_file import GGUFSummary, TensorInfo

__all__ = ["N_EMBD", "N_VOCAB", "plan", "weight_types", "is_moe", "write_kernel_model"]

N_EMBD = 256  # a whole K-quant super-block: every type's block size divides it
N_VOCAB = 256
N_HEAD = 4
N_EXPERT, N_EXPERT_USED = 4, 2
_DENSE = ("attn_q", "attn_k", "attn_v", "attn_output")
_MLP = ("ffn_gate", "ffn_up", "ffn_down")
_EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_FLOAT = (GGMLQuantizationType.F32,)


def _is_weight(t: TensorInfo) -> bool:
    """A matrix (or a stack of expert matrices) that a matmul reads."""
    return len(t.shape) >= 2 and t.shape[1] > 1 and t.ggml_type not in _FLOAT


def _widest(summary: GGUFSummary) -> dict[GGMLQuantizationType, TensorInfo]:
    """Per weight type, its tensor with the longest rows (the largest among equals)."""
    best: dict[GGMLQuantizationType, TensorInfo] = {}
    for t in summary.tensors:
        if _is_weight(t):
            old = best.get(t.ggml_type)
            if old is None or (t.shape[0], t.n_bytes) > (old.shape[0], old.n_bytes):
                best[t.ggml_type] = t
    return best


def plan(summary: GGUFSummary) -> tuple[int, dict[str, TensorInfo]]:
    """The tiny model's width and, per weight type it covers, the tensor its rows come from.

    The width is N_EMBD where every type's rows are that long (any real model), else the
    longest that every row holds and every block size divides (the tiny test fixtures).
    """
    sources = _widest(summary)
    if not sources:
        return N_EMBD, {}
    blocks = [GGML_QUANT_SIZES[q][0] for q in sources]
    step = math.lcm(*blocks)
    width = min(N_EMBD, min(t.shape[0] for t in sources.values())) // step * step
    if width == 0:  # some type's rows are too short for the others' blocks: drop it
        width = N_EMBD
    return width, {q.name: t for q, t in sources.items()
                   if t.shape[0] >= width and width % GGML_QUANT_SIZES[q][0] == 0}


def weight_types(summary: GGUFSummary) -> tuple[str, ...]:
    """The types of the matmul weights of ``summary`` that the tiny model covers, sorted."""
    return tuple(sorted(plan(summary)[1]))


def is_moe(summary: GGUFSummary) -> bool:
    """True when the model has expert stacks (3-D weights): the test then covers MUL_MAT_ID."""
    return any(len(t.shape) == 3 and t.shape[2] > 1 for t in summary.tensors if _is_weight(t))


def _rows(summary: GGUFSummary, info: TensorInfo, n_rows: int, width: int) -> np.ndarray:
    """``n_rows`` rows of ``width`` columns, encoded as stored, taken in turn from ``info``."""
    block, size = GGML_QUANT_SIZES[info.ggml_type]
    row_bytes = info.shape[0] // block * size
    total_rows = info.n_elements // info.shape[0]
    mm = np.memmap(summary.path, dtype=np.uint8, mode="r", offset=info.offset,
                   shape=(total_rows, row_bytes))
    picked = np.arange(n_rows) % total_rows
    return np.ascontiguousarray(mm[picked, : width // block * size])


def write_kernel_model(summary: GGUFSummary, out: Path, *, poison: bool = False) -> Path:
    """Writes the tiny model for ``summary``'s weight types to ``out``.

    Args:
        summary: the real model's header.
        out: the file to write.
        poison: put a NaN in the embeddings (fault injection: the logits come out NaN).
    """
    width, sources = plan(summary)
    types = sorted(sources)
    moe = is_moe(summary)
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(out), "llama")
    w.add_name("ggufllm kernel self-test")
    w.add_context_length(512)
    w.add_embedding_length(width)
    w.add_feed_forward_length(width)
    w.add_block_count(len(types))
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(width // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(N_VOCAB)
    w.add_tokenizer_model("none")
    if moe:
        w.add_expert_count(N_EXPERT)
        w.add_expert_used_count(N_EXPERT_USED)
    embd = rng.standard_normal((N_VOCAB, width), dtype=np.float32)
    if poison:
        embd[:, 0] = np.nan
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(width, dtype=np.float32))
    w.add_tensor("output.weight", rng.standard_normal((N_VOCAB, width), dtype=np.float32) * 0.05)
    for layer, name in enumerate(types):
        qtype, source = GGMLQuantizationType[name], sources[name]
        ones = np.ones(width, dtype=np.float32)
        w.add_tensor(f"blk.{layer}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{layer}.ffn_norm.weight", ones)
        matrices = [(n, 1) for n in _DENSE] + [(n, N_EXPERT if moe else 1)
                                               for n in (_EXPERTS if moe else _MLP)]
        if moe:
            w.add_tensor(f"blk.{layer}.ffn_gate_inp.weight",
                         rng.standard_normal((N_EXPERT, width), dtype=np.float32))
        for tensor, stack in matrices:
            data = _rows(summary, source, width * stack, width)  # rows of encoded bytes
            rows = (stack, width) if stack > 1 else (width,)
            w.add_tensor(f"blk.{layer}.{tensor}.weight", data.reshape(*rows, -1), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
