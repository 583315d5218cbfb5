"""Builds small GGUF files byte by byte, valid or crafted to be broken."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

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
