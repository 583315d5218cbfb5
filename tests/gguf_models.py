"""Tiny but complete GGUF models (llama, gemma3, gpt-oss) whose every key can be made wrong.

Each model has real tensor names and shapes for its architecture, F32 weights
from a fixed seed and a small real vocabulary (byte-level BPE or SentencePiece),
so llama.cpp loads it and generates. The semantic corpus in ``gguf_corpus``
changes one value at a time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
        BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
# token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value: Any) -> bytes:
    if vtype == STR:
        return _str(value)
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, v) for v in items)
    return struct.pack(_FMT[vtype], value)


@dataclass
class TinyModel:
    """An ordered set of typed keys and F32 tensors (numpy order: last axis = row)."""

    kv: dict[str, tuple[int, Any]] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return str(self.kv["general.architecture"][1])

    def set(self, key: str, vtype: int, value: Any) -> TinyModel:
        if "{arch}" in key:
            key = key.replace("{arch}", self.arch)
        self.kv[key] = (vtype, value)
        return self

    def drop(self, key: str) -> TinyModel:
        self.kv.pop(key.replace("{arch}", self.arch), None)
        return self

    def tokens(self) -> list[str]:
        return list(self.kv["tokenizer.ggml.tokens"][1][1])

    def set_tokens(self, tokens: list[str | bytes]) -> TinyModel:
        return self.set("tokenizer.ggml.tokens", ARR, (STR, tokens))

    def build(self) -> bytes:
        out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(self.tensors), len(self.kv)))
        for key, (vtype, value) in self.kv.items():
            out += _str(key) + struct.pack("<I", vtype) + _value(vtype, value)
        data, offset = bytearray(), 0
        for name, arr in self.tensors.items():
            out += _str(name) + struct.pack("<I", arr.ndim)
            out += b"".join(struct.pack("<Q", d) for d in reversed(arr.shape))
            out += struct.pack("<IQ", 0, offset)  # type 0 = F32
            raw = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
            raw += b"\0" * (-len(raw) % 32)
            data += raw
            offset += len(raw)
        out += b"\0" * (-len(out) % 32)
        return bytes(out + data)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ is"]


def bpe_vocab(model: TinyModel, pre: str) -> None:
    """256 byte tokens, a few merges, three control tokens."""
    byte_chars = _bytes_to_unicode()
    merged = [m.replace(" ", "") for m in BPE_MERGES]
    tokens = byte_chars + merged + BPE_SPECIALS
    types = [NORMAL] * (len(tokens) - len(BPE_SPECIALS)) + [CONTROL] * len(BPE_SPECIALS)
    eos = len(tokens) - len(BPE_SPECIALS)
    model.set("tokenizer.ggml.model", STR, "gpt2").set("tokenizer.ggml.pre", STR, pre)
    model.set_tokens(tokens).set("tokenizer.ggml.token_type", ARR, (I32, types))
    model.set("tokenizer.ggml.merges", ARR, (STR, list(BPE_MERGES)))
    model.set("tokenizer.ggml.bos_token_id", U32, eos).set("tokenizer.ggml.eos_token_id", U32, eos)
    model.set("tokenizer.ggml.add_bos_token", BOOL, False)


def spm_vocab(model: TinyModel) -> None:
    """SentencePiece: 4 specials, 256 byte tokens, a few pieces."""
    pieces = ["▁", "▁the", "▁is", "<start_of_turn>", "<end_of_turn>"] + [chr(c) for c in range(97, 123)]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN] + [BYTE] * 256 + [NORMAL] * len(pieces)
    types[260 + 3] = types[260 + 4] = CONTROL
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))]
    model.set("tokenizer.ggml.model", STR, "llama").set("tokenizer.ggml.pre", STR, "default")
    model.set_tokens(tokens).set("tokenizer.ggml.token_type", ARR, (I32, types))
    model.set("tokenizer.ggml.scores", ARR, (F32, scores))
    for role, i in (("bos", 2), ("eos", 1), ("unknown", 3), ("padding", 0)):
        model.set(f"tokenizer.ggml.{role}_token_id", U32, i)
    model.set("tokenizer.ggml.add_bos_token", BOOL, True)


EMBD, HEADS, KV_HEADS, HEAD_DIM, FF, LAYERS, EXPERTS = 32, 4, 2, 8, 64, 2, 4


def _weights(model: TinyModel, n_vocab: int, arch: str, seed: int) -> None:
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.2, center: float = 0.0) -> np.ndarray:
        return (center + scale * rng.standard_normal(shape)).astype(np.float32)

    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    t = model.tensors
    t["token_embd.weight"] = w(n_vocab, EMBD, scale=1.0)
    t["output_norm.weight"] = w(EMBD, scale=0.1, center=1.0)
    for i in range(LAYERS):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = w(EMBD, scale=0.1, center=1.0)
        t[p + "attn_q.weight"], t[p + "attn_k.weight"] = w(q, EMBD), w(kv, EMBD)
        t[p + "attn_v.weight"], t[p + "attn_output.weight"] = w(kv, EMBD), w(EMBD, q)
        if arch == "gpt-oss":
            for name, n in (("attn_q", q), ("attn_k", kv), ("attn_v", kv), ("attn_output", EMBD)):
                t[p + name + ".bias"] = w(n, scale=0.02)
            t[p + "attn_sinks.weight"] = w(HEADS, scale=1.0)
            t[p + "post_attention_norm.weight"] = w(EMBD, scale=0.1, center=1.0)
            t[p + "ffn_gate_inp.weight"], t[p + "ffn_gate_inp.bias"] = w(EXPERTS, EMBD), w(EXPERTS)
            for name, shape in (("gate", (FF, EMBD)), ("up", (FF, EMBD)), ("down", (EMBD, FF))):
                t[p + f"ffn_{name}_exps.weight"] = w(EXPERTS, *shape)
                t[p + f"ffn_{name}_exps.bias"] = w(EXPERTS, shape[0], scale=0.02)
            continue
        t[p + "ffn_norm.weight"] = w(EMBD, scale=0.1, center=1.0)
        t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"] = w(FF, EMBD), w(FF, EMBD)
        t[p + "ffn_down.weight"] = w(EMBD, FF)
        if arch == "gemma3":
            t[p + "attn_q_norm.weight"] = w(HEAD_DIM, scale=0.1, center=1.0)
            t[p + "attn_k_norm.weight"] = w(HEAD_DIM, scale=0.1, center=1.0)
            t[p + "post_attention_norm.weight"] = w(EMBD, scale=0.1, center=1.0)
            t[p + "post_ffw_norm.weight"] = w(EMBD, scale=0.1, center=1.0)
    if arch == "gpt-oss":
        t["output.weight"] = w(n_vocab, EMBD)


def tiny_model(arch: str = "llama", seed: int = 0) -> TinyModel:
    """A loadable two-layer model of ``arch`` ("llama", "gemma3" or "gpt-oss")."""
    m = TinyModel()
    m.set("general.architecture", STR, arch).set("general.name", STR, f"tiny-{arch}")
    m.set("general.file_type", U32, 0)
    a = "{arch}."
    m.set(a + "context_length", U32, 256).set(a + "embedding_length", U32, EMBD)
    m.set(a + "block_count", U32, LAYERS).set(a + "feed_forward_length", U32, FF)
    m.set(a + "attention.head_count", U32, HEADS).set(a + "attention.head_count_kv", U32, KV_HEADS)
    m.set(a + "attention.layer_norm_rms_epsilon", F32, 1e-5)
    m.set(a + "rope.freq_base", F32, 10000.0)
    if arch == "llama":
        m.set(a + "rope.dimension_count", U32, HEAD_DIM)
        bpe_vocab(m, "smollm")
    elif arch == "gemma3":
        m.set(a + "attention.key_length", U32, HEAD_DIM).set(a + "attention.value_length", U32, HEAD_DIM)
        m.set(a + "attention.sliding_window", U32, 4)
        spm_vocab(m)
    elif arch == "gpt-oss":
        m.set(a + "attention.key_length", U32, HEAD_DIM).set(a + "attention.value_length", U32, HEAD_DIM)
        m.set(a + "attention.sliding_window", U32, 4)
        m.set(a + "expert_count", U32, EXPERTS).set(a + "expert_used_count", U32, 2)
        m.set(a + "expert_feed_forward_length", U32, FF)
        bpe_vocab(m, "gpt-4o")
    else:
        raise ValueError(arch)
    _weights(m, len(m.tokens()), arch, seed)
    return m
