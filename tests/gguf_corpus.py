"""Builds small GGUF files byte by byte, valid or crafted to be broken."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from .gguf_models import ARR, I32, NORMAL, STR, TinyModel, tiny_model

STRING, ARRAY, UINT32, FLOAT32 = 8, 9, 4, 6
F32, Q8_0 = 0, 8


def gguf_string(s: bytes | str, length: int | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if length is None else length) + b


@dataclass
class Spec:
    """A GGUF file described field by field; every field can be made wrong."""

    magic: bytes = b"GGUF"
    version: int = 3
    tensor_count: int | None = None
    kv_count: int | None = None
    kvs: list[bytes] = field(default_factory=list)
    tensors: list[tuple[bytes, list[int], int, int]] = field(default_factory=list)
    n_dims_override: dict[int, int] = field(default_factory=dict)
    data: bytes = b""
    alignment: int = 32

    def build(self) -> bytes:
        out = bytearray(self.magic)
        out += struct.pack("<I", self.version)
        out += struct.pack("<Q", len(self.tensors) if self.tensor_count is None else self.tensor_count)
        out += struct.pack("<Q", len(self.kvs) if self.kv_count is None else self.kv_count)
        for kv in self.kvs:
            out += kv
        for i, (name, dims, ttype, offset) in enumerate(self.tensors):
            out += gguf_string(name)
            out += struct.pack("<I", self.n_dims_override.get(i, len(dims)))
            for d in dims:
                out += struct.pack("<Q", d)
            out += struct.pack("<IQ", ttype, offset)
        out += b"\0" * (-len(out) % self.alignment)
        return bytes(out + self.data)


def kv_string(key: str, value: str) -> bytes:
    return gguf_string(key) + struct.pack("<I", STRING) + gguf_string(value)


def kv_u32(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<II", UINT32, value)


def valid_spec() -> Spec:
    """Two tensors: an F32 [8] and a Q8_0 [32, 2] (2 blocks of 34 bytes)."""
    return Spec(
        kvs=[kv_string("general.architecture", "llama"), kv_u32("llama.context_length", 64),
             gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING, 2)
             + gguf_string("a") + gguf_string("b")],
        tensors=[(b"a.weight", [8], F32, 0), (b"b.weight", [32, 2], Q8_0, 32)],
        data=b"\1" * 32 + b"\2" * 68,
    )


def corpus() -> dict[str, bytes]:
    """Crafted files, each of which must be refused before llama.cpp sees it."""
    good = valid_spec().build()
    files: dict[str, bytes] = {"empty": b"", "magic_only": b"GGUF", "bad_magic": b"GGML" + good[4:]}

    def variant(name: str, **changes: object) -> None:
        spec = valid_spec()
        for k, v in changes.items():
            setattr(spec, k, v)
        files[name] = spec.build()

    variant("version_1", version=1)
    variant("version_99", version=99)
    variant("huge_tensor_count", tensor_count=1 << 40)
    variant("huge_kv_count", kv_count=1 << 40)
    variant("more_tensors_than_present", tensor_count=5)
    variant("huge_key_length", kvs=[gguf_string(b"general.architecture", 1 << 60)])
    variant("unknown_value_type", kvs=[gguf_string("k") + struct.pack("<I", 77) + b"\0" * 8])
    variant("huge_array", kvs=[gguf_string("t") + struct.pack("<IIQ", ARRAY, UINT32, 1 << 58)])
    variant("huge_string_array",
            kvs=[gguf_string("t") + struct.pack("<IIQ", ARRAY, STRING, 1 << 50)])
    variant("array_of_unknown_type", kvs=[gguf_string("t") + struct.pack("<IIQ", ARRAY, 99, 1)])
    variant("duplicate_key", kvs=[kv_u32("a", 1), kv_u32("a", 2)])
    variant("zero_dims", n_dims_override={0: 0})
    variant("too_many_dims", n_dims_override={0: 9})
    variant("huge_dimension", tensors=[(b"a.weight", [1 << 62], F32, 0)])
    variant("absurd_shape", tensors=[(b"a.weight", [1 << 30, 1 << 30, 1 << 30], F32, 0)])
    variant("zero_dimension", tensors=[(b"a.weight", [8, 0], F32, 0)])
    variant("unknown_type_id", tensors=[(b"a.weight", [8], 200, 0)])
    variant("removed_type_id", tensors=[(b"a.weight", [8], 4, 0)])  # Q4_2, gone from ggml
    variant("data_past_end", tensors=[(b"a.weight", [8], F32, 0), (b"b.weight", [32, 4], Q8_0, 32)])
    variant("offset_past_end", tensors=[(b"a.weight", [8], F32, 1 << 40)])
    variant("misaligned_offset", tensors=[(b"a.weight", [8], F32, 4)])
    variant("duplicate_tensor", tensors=[(b"a.weight", [8], F32, 0), (b"a.weight", [8], F32, 0)])
    variant("row_not_block_multiple", tensors=[(b"b.weight", [31, 2], Q8_0, 0)])
    variant("bad_alignment", kvs=[kv_u32("general.alignment", 24)])
    files["truncated_in_kv"] = good[:40]
    files["truncated_in_tensor_info"] = good[: good.index(b"b.weight") + 4]
    files["truncated_in_data"] = good[:-10]
    return files


# -- semantic cases: a well-formed tiny model with one value made wrong ---------------

@dataclass(frozen=True)
class Case:
    """A tiny model with one wrong value, and what bare llama.cpp does with it.

    ``crash``: where unguarded llama.cpp dies ("load": while loading the metadata or
    vocabulary, "prompt": at the first prompt, "graph": at the first decode, "hang":
    never returns), or None when it refuses the file cleanly or runs it.
    """

    arch: str
    change: Callable[[TinyModel], object]
    crash: str | None = None


def _tokens(edit: Callable[[list], None]) -> Callable[[TinyModel], object]:
    def change(m: TinyModel) -> None:
        t = m.tokens()
        edit(t)
        m.set_tokens(t)
    return change


def _types(edit: Callable[[list], None]) -> Callable[[TinyModel], object]:
    def change(m: TinyModel) -> None:
        t = list(m.kv["tokenizer.ggml.token_type"][1][1])
        edit(t)
        m.set("tokenizer.ggml.token_type", ARR, (I32, t))
    return change


def _no_byte_tokens(m: TinyModel) -> None:
    m.set_tokens([f"x{i}" if s.startswith("<0x") else s for i, s in enumerate(m.tokens())])
    _types(lambda t: t.__setitem__(slice(4, 260), [NORMAL] * 256))(m)


A = "{arch}."
SEMANTIC: dict[str, Case] = {
    # hyper-parameters: GGML_ASSERTs in llama-model.cpp load_hparams
    "block_count_0": Case("llama", lambda m: m.set(A + "block_count", UINT32, 0), "load"),
    "block_count_100000": Case("llama", lambda m: m.set(A + "block_count", UINT32, 100000), "load"),
    "nextn_layers_over_block_count": Case(
        "llama", lambda m: m.set(A + "nextn_predict_layers", UINT32, 5), "load"),
    "expert_count_over_max": Case("gpt-oss", lambda m: m.set(A + "expert_count", UINT32, 5000), "load"),
    "experts_used_over_count": Case(
        "gpt-oss", lambda m: m.set(A + "expert_used_count", UINT32, 8), "load"),
    "experts_used_zero": Case("gpt-oss", lambda m: m.set(A + "expert_used_count", UINT32, 0), "load"),
    "experts_used_without_experts": Case(
        "llama", lambda m: m.set(A + "expert_used_count", UINT32, 2), "load"),
    "experts_used_per_layer_over_count": Case(
        "gpt-oss", lambda m: m.set(A + "expert_used_count", ARR, (UINT32, [2, 9])), "load"),
    "experts_used_zero_in_one_layer": Case(  # SIGSEGV
        "gpt-oss", lambda m: m.set(A + "expert_used_count", ARR, (UINT32, [2, 0])), "graph"),
    "expert_groups_not_below_count": Case(
        "gpt-oss", lambda m: m.set(A + "expert_group_count", UINT32, 4), "load"),
    "expert_groups_not_dividing": Case("gpt-oss", lambda m: m.set(
        A + "expert_group_count", UINT32, 3).set(A + "expert_group_used_count", UINT32, 1), "load"),
    "expert_groups_used_zero": Case(
        "gpt-oss", lambda m: m.set(A + "expert_group_count", UINT32, 2), "load"),
    "expert_groups_without_experts": Case(
        "llama", lambda m: m.set(A + "expert_group_count", UINT32, 2), "load"),
    "rope_scaling_type_unknown": Case(
        "llama", lambda m: m.set(A + "rope.scaling.type", STR, "bogus"), "load"),
    # hyper-parameters that pass the load and abort (or loop) in the first decode
    "rms_eps_nan": Case(
        "llama", lambda m: m.set(A + "attention.layer_norm_rms_epsilon", FLOAT32, float("nan")), "graph"),
    "rms_eps_negative": Case(
        "gpt-oss", lambda m: m.set(A + "attention.layer_norm_rms_epsilon", FLOAT32, -1.0), "graph"),
    "rope_dims_odd": Case("gemma3", lambda m: m.set(A + "rope.dimension_count", UINT32, 7), "graph"),
    "rope_dims_over_head": Case(
        "gemma3", lambda m: m.set(A + "rope.dimension_count", UINT32, 64), "graph"),
    "rope_dims_zero": Case("gemma3", lambda m: m.set(A + "rope.dimension_count", UINT32, 0), "hang"),
    "rope_dims_swa_zero": Case(
        "gemma3", lambda m: m.set(A + "rope.dimension_count_swa", UINT32, 0), "hang"),
    "rope_dims_swa_over_head": Case(
        "gemma3", lambda m: m.set(A + "rope.dimension_count_swa", UINT32, 64), "graph"),
    "value_length_not_key_length": Case(
        "gpt-oss", lambda m: m.set(A + "attention.value_length", UINT32, 4), "graph"),
    "kv_heads_zero_in_one_layer": Case(
        "llama", lambda m: m.set(A + "attention.head_count_kv", ARR, (UINT32, [2, 0])), "graph"),
    # vocabulary: llama-vocab.cpp
    "duplicate_token_bpe": Case("llama", _tokens(lambda t: t.__setitem__(200, t[201])), "load"),
    "duplicate_token_spm": Case("gemma3", _tokens(lambda t: t.__setitem__(270, t[271])), "load"),
    "empty_token_named_like_another": Case(
        "llama", _tokens(lambda t: t.__setitem__(slice(5, 7), ["", "[EMPTY_5]"])), "load"),
    # llama.cpp reads a token as a C string: "x\0y" is "x", which id 120 already is
    "token_with_nul_repeats_another": Case(
        "llama", _tokens(lambda t: t.__setitem__(200, b"x\0y")), "load"),
    "byte_tokens_in_wordpiece": Case("llama", lambda m: (
        m.set("tokenizer.ggml.model", STR, "bert"), _types(lambda t: t.__setitem__(65, 6))(m)),
        "load"),
    "spm_without_byte_tokens": Case("gemma3", _no_byte_tokens, "prompt"),
    # refused cleanly by llama.cpp, or harmless: must stay that way
    "block_count_missing": Case("llama", lambda m: m.drop(A + "block_count")),
    "head_count_zero": Case("llama", lambda m: m.set(A + "attention.head_count", UINT32, 0)),
    "kv_heads_not_dividing": Case("llama", lambda m: m.set(A + "attention.head_count_kv", UINT32, 3)),
    "embedding_length_zero": Case("llama", lambda m: m.set(A + "embedding_length", UINT32, 0)),
    "context_length_zero": Case("gpt-oss", lambda m: m.set(A + "context_length", UINT32, 0)),
    "sliding_window_zero": Case("gpt-oss", lambda m: m.set(A + "attention.sliding_window", UINT32, 0)),
    "architecture_unknown": Case("llama", lambda m: m.set("general.architecture", STR, "nosuch")),
    "no_tokens": Case("llama", lambda m: (m.set_tokens([]), m.set(
        "tokenizer.ggml.token_type", ARR, (I32, [])))),
    "scores_shorter_than_tokens": Case(
        "gemma3", lambda m: m.set("tokenizer.ggml.scores", ARR, (FLOAT32, [0.0]))),
    "token_types_shorter_than_tokens": Case(
        "llama", lambda m: m.set("tokenizer.ggml.token_type", ARR, (I32, [1]))),
    "merges_missing": Case("llama", lambda m: m.drop("tokenizer.ggml.merges")),
    "merges_malformed_or_unknown": Case("llama", lambda m: m.set(
        "tokenizer.ggml.merges", ARR, (STR, ["ab", " ", "", "zz qq", "Ġt he"]))),
    "tokenizer_model_unknown": Case("llama", lambda m: m.set("tokenizer.ggml.model", STR, "nosuch")),
    "pre_tokenizer_unknown": Case("llama", lambda m: m.set("tokenizer.ggml.pre", STR, "nosuch")),
    "bos_id_out_of_range": Case("llama", lambda m: m.set("tokenizer.ggml.bos_token_id", UINT32, 10**6)),
    "eos_id_out_of_range": Case(
        "gpt-oss", lambda m: m.set("tokenizer.ggml.eos_token_id", UINT32, 0xFFFFFFFF)),
    "pad_id_out_of_range": Case(
        "gemma3", lambda m: m.set("tokenizer.ggml.padding_token_id", UINT32, 99999)),
    "token_starting_with_nul": Case("llama", _tokens(lambda t: t.__setitem__(200, b"\0q"))),
    "token_invalid_utf8": Case("llama", _tokens(lambda t: t.__setitem__(200, b"\xff\xfe"))),
    "valid_llama": Case("llama", lambda m: None),
    "valid_gemma3": Case("gemma3", lambda m: None),
    "valid_gpt_oss": Case("gpt-oss", lambda m: None),
}


def semantic_corpus() -> dict[str, bytes]:
    """Each semantic case built: a loadable tiny model with its one change."""
    out = {}
    for name, case in SEMANTIC.items():
        m = tiny_model(case.arch)
        case.change(m)
        out[name] = m.build()
    return out
