"""Semantic checks: metadata values that make llama.cpp abort instead of failing.

llama.cpp refuses most bad files with an error, but some values reach a
``GGML_ASSERT`` (or a segfault, or an endless loop) and take the whole process
down. Each rule below names the vendored llama.cpp line it guards (llama-cpp-python
0.3.36); each was reproduced with a crafted file (``tests/gguf_corpus.py``).
Values of the wrong type are left to llama.cpp, which refuses them cleanly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TokenTable", "hparam_problems", "vocab_problems", "MAX_LAYERS", "MAX_EXPERTS"]

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS (llama-hparams.h)
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # LLAMA_ROPE_SCALING_TYPES
TOKEN_TYPE_BYTE = 6
# Per-layer zeros are legitimate in hybrid models (Jamba has no K/V heads in its Mamba
# layers), so the per-layer rules apply to the all-attention architectures we test.
_ALL_ATTENTION = ("llama", "gemma3", "gpt-oss")


def _int(meta: dict[str, Any], key: str) -> int | None:
    v = meta.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _per_layer(meta: dict[str, Any], arrays: dict[str, np.ndarray], key: str,
               n_layer: int) -> list[int] | None:
    """A key llama.cpp reads with ``get_key_or_arr``: one value, or one per layer."""
    if key in arrays:
        values = arrays[key]
        if values.dtype.kind not in "iu" or len(values) != n_layer:
            return None  # llama.cpp throws "wrong array length" / "wrong type"
        return [int(v) for v in values]
    v = _int(meta, key)
    return None if v is None else [v] * n_layer


def _block_count(meta: dict[str, Any], a: str) -> tuple[int | None, list[str]]:
    n = _int(meta, f"{a}.block_count")
    if n is None:
        return None, []
    # llama-model.cpp load_hparams: GGML_ASSERT(n_layer_all > 0 && <= LLAMA_MAX_LAYERS)
    if not 0 < n <= MAX_LAYERS:
        return None, [f"{a}.block_count = {n}: llama.cpp supports 1..{MAX_LAYERS} layers"]
    nextn = _int(meta, f"{a}.nextn_predict_layers")
    if nextn is not None and nextn > n:  # GGML_ASSERT(n_layer_nextn <= n_layer_all)
        return None, [f"{a}.nextn_predict_layers = {nextn} exceeds {a}.block_count = {n}"]
    return n, []


def _expert_problems(meta: dict[str, Any], arrays: dict[str, np.ndarray], a: str,
                     n_layer: int) -> list[str]:
    """GGML_ASSERTs on expert counts in llama-model.cpp load_hparams."""
    n_expert = _int(meta, f"{a}.expert_count") or 0
    used = _per_layer(meta, arrays, f"{a}.expert_used_count", n_layer)
    if used is None:
        if f"{a}.expert_used_count" in arrays:
            return []  # a wrong-length array: llama.cpp throws, cleanly
        used = [0]
    groups = _int(meta, f"{a}.expert_group_count") or 0
    group_used = _int(meta, f"{a}.expert_group_used_count") or 0
    k_count, k_used = f"{a}.expert_count", f"{a}.expert_used_count"
    k_groups = f"{a}.expert_group_count"
    if n_expert > MAX_EXPERTS:
        return [f"{k_count} = {n_expert} exceeds llama.cpp's limit of {MAX_EXPERTS}"]
    if max(used) > n_expert:
        return [f"{k_used} = {max(used)} exceeds {k_count} = {n_expert}"]
    if n_expert == 0:
        return [f"{k_groups} = {groups} without experts"] if groups else []
    if max(used) == 0 or (min(used) == 0 and a in _ALL_ATTENTION):
        # GGML_ASSERT(n_expert_used_max > 0); one zero layer segfaults gpt-oss's graph
        return [f"{k_used} is 0 (for some layer) while {k_count} = {n_expert}"]
    if groups >= n_expert:
        return [f"{k_groups} = {groups} must be below {k_count} = {n_expert}"]
    if groups > 1 and (n_expert % groups or not 0 < group_used < groups):
        return [f"{k_groups} = {groups} / {a}.expert_group_used_count = {group_used} do not "
                f"split {n_expert} experts"]
    return []


def _head_problems(meta: dict[str, Any], arrays: dict[str, np.ndarray], a: str,
                   n_layer: int) -> list[str]:
    heads = _per_layer(meta, arrays, f"{a}.attention.head_count", n_layer)
    if heads is None:
        return []
    kv = _per_layer(meta, arrays, f"{a}.attention.head_count_kv", n_layer) or heads
    # a layer with query heads but no K/V heads fails a ggml_mul_mat shape assert
    # when the first graph is built (reproduced on llama with head_count_kv [2, 0])
    bad = [i for i, (h, k) in enumerate(zip(heads, kv, strict=True)) if h and not k]
    if bad and (a in _ALL_ATTENTION or len(set(kv)) == 1):
        return [f"{a}.attention.head_count_kv is 0 for layer {bad[0]}, which has query heads"]
    if a == "gemma3" and not heads[0]:  # gemma3 divides n_embd by n_head(0) (27B branch)
        return [f"{a}.attention.head_count is 0"]
    embd = _int(meta, f"{a}.embedding_length")
    if not heads[0] or not embd:
        return []
    problems = []
    k_len = _int(meta, f"{a}.attention.key_length") or embd // heads[0]
    v_len = _int(meta, f"{a}.attention.value_length")
    if a == "gpt-oss" and v_len is not None and v_len != k_len:
        # gpt-oss sizes V by the rope/key width: another value aborts in the first graph
        problems.append(f"{a}.attention.value_length = {v_len} differs from key_length {k_len}")
    k_swa = _int(meta, f"{a}.attention.key_length_swa") or k_len
    rot = _int(meta, f"{a}.rope.dimension_count")
    rot_swa = _int(meta, f"{a}.rope.dimension_count_swa")
    for key, dims, width in ((f"{a}.rope.dimension_count", rot, k_len),
                             (f"{a}.rope.dimension_count_swa",
                              rot if rot_swa is None else rot_swa, k_swa)):
        # ggml-cpu rope: GGML_ASSERT(n_dims <= ne0) and (n_dims % 2 == 0); 0 loops forever
        if dims is not None and (dims <= 0 or dims % 2 or dims > width):
            problems.append(f"{key} = {dims}: must be even and within 1..{width} "
                            f"(the head width)")
    return problems


def hparam_problems(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[str]:
    """Hyper-parameters that would abort llama.cpp; empty when none.

    Args:
        meta: scalar metadata (key -> value) from the header.
        arrays: numeric array metadata (key -> values), short arrays only.

    Returns:
        One message per problem, each naming its key.
    """
    a = str(meta.get("general.architecture", ""))
    n_layer, problems = _block_count(meta, a)
    if n_layer is None:
        return problems
    problems += _expert_problems(meta, arrays, a, n_layer)
    problems += _head_problems(meta, arrays, a, n_layer)
    scaling = meta.get(f"{a}.rope.scaling.type")
    if isinstance(scaling, str) and scaling not in ROPE_SCALING_TYPES:
        # GGML_ASSERT(rope_scaling_type_train != LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED)
        problems.append(f"{a}.rope.scaling.type = {scaling!r} is not one of "
                        f"{', '.join(ROPE_SCALING_TYPES)}")
    for key in (f"{a}.attention.layer_norm_rms_epsilon", f"{a}.attention.layer_norm_epsilon"):
        eps = meta.get(key)
        # ggml-cpu norm: GGML_ASSERT(eps >= 0.0f), which NaN fails too
        if isinstance(eps, float) and (math.isnan(eps) or eps < 0):
            problems.append(f"{key} = {eps}: must be a non-negative number")
    return problems


@dataclass(frozen=True)
class TokenTable:
    """``tokenizer.ggml.tokens`` as one byte buffer: token i is
    ``data[starts[i]:starts[i] + lengths[i]]`` (numpy, so 262k tokens check in ms)."""

    data: np.ndarray  # uint8
    starts: np.ndarray  # int64
    lengths: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.starts)

    def token(self, i: int) -> bytes:
        return self.data[self.starts[i]:self.starts[i] + self.lengths[i]].tobytes()

    def of_length(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, bytes as rows of ``n`` uint8) of the tokens of ``n`` bytes."""
        ids = np.flatnonzero(self.lengths == n)
        return ids, self.data[self.starts[ids, None] + np.arange(n)]


_MIX = np.uint64(0x9E3779B97F4A7C15)  # an odd constant (the golden-ratio hash)


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """One uint64 per row of bytes: exact up to 8 bytes, a hash beyond."""
    k, n = rows.shape
    padded = np.zeros((k, n + (-n % 8)), dtype=np.uint8)
    padded[:, :n] = rows
    words = padded.view(np.uint64)
    keys = words[:, 0].copy()
    with np.errstate(over="ignore"):  # wrapping is the point
        for j in range(1, words.shape[1]):
            keys = keys * _MIX + words[:, j]
    return keys


def _duplicate_token(table: TokenTable) -> str | None:
    # llama-vocab.cpp load: an empty token becomes "[EMPTY_<id>]", then
    # GGML_ASSERT(id_to_token.size() == token_to_id.size()) fails on any duplicate
    for n in np.unique(table.lengths):
        if n == 0:
            continue
        ids, rows = table.of_length(int(n))
        keys = _row_keys(rows)
        order = np.argsort(keys, kind="stable")
        for k in np.flatnonzero(keys[order][1:] == keys[order][:-1]):
            a, b = order[k], order[k + 1]
            if np.array_equal(rows[a], rows[b]):
                i, j = sorted((int(ids[a]), int(ids[b])))
                return f"tokenizer.ggml.tokens: ids {i} and {j} are both {table.token(i)[:40]!r}"
    for i in np.flatnonzero(table.lengths == 0):
        name = f"[EMPTY_{i}]".encode()
        ids, rows = table.of_length(len(name))
        hit = ids[(rows == np.frombuffer(name, np.uint8)).all(axis=1)]
        if len(hit):
            return (f"tokenizer.ggml.tokens: id {i} is empty, which llama.cpp renames "
                    f"{name.decode()}, the text of id {hit[0]}")
    return None


def _missing_byte_tokens(table: TokenTable) -> list[int]:
    _, rows = table.of_length(6)  # "<0xAB>"
    have = {bytes(r) for r in rows[(rows[:, 0] == ord("<")) & (rows[:, 5] == ord(">"))]}
    return [b for b in range(256) if f"<0x{b:02X}>".encode() not in have]


def vocab_problems(meta: dict[str, Any], tokens: TokenTable | None,
                   token_types: np.ndarray | None) -> list[str]:
    """Vocabulary contents that would abort llama.cpp; empty when none.

    Args:
        meta: scalar metadata.
        tokens: ``tokenizer.ggml.tokens`` (None when absent).
        token_types: ``tokenizer.ggml.token_type`` (None when absent or not int32).

    Returns:
        One message per problem, each naming its key.
    """
    if tokens is None:
        return []
    model = meta.get("tokenizer.ggml.model")
    problems = []
    dup = _duplicate_token(tokens)
    if dup:
        problems.append(dup)
    if model == "bert" and token_types is not None \
            and bool(np.any(token_types[: len(tokens)] == TOKEN_TYPE_BYTE)):
        # WPM has no byte tokens: token_to_byte() hits GGML_ABORT while caching pieces
        problems.append("tokenizer.ggml.token_type marks byte tokens in a 'bert' (WordPiece) "
                        "vocabulary")
    if model == "llama":
        # SentencePiece falls back to <0xXX> tokens for unknown text; a missing one is an
        # uncaught std::out_of_range (std::terminate) at the first such prompt
        missing = _missing_byte_tokens(tokens)
        if missing:
            problems.append(f"tokenizer.ggml.tokens: SentencePiece vocabulary lacks "
                            f"{len(missing)} byte tokens (first <0x{missing[0]:02X}>)")
    return problems
