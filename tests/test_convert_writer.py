"""The converter's bulk array packing writes the bytes gguf-py's writer writes, and refuses what
it refuses (the whole-file check against llama.cpp's converter is test_convert_fidelity.py)."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from convert.writer import FastArrayWriter

V = gguf.GGUFValueType
ARRAYS = {
    "strings": (["a", "", "ĠHamlet", "é\u4e2d😀", "<|return|>", "x" * 300], None),
    "merges": (["Ġ t", "h e", "Ġt he"] * 50, None),
    "ints": ([0, 1, -5, 2**31 - 1, -(2**31)], None),
    "token types": ([int(t) for t in gguf.TokenType] * 3, None),
    "floats": ([0.0, -1.5, 3.14159, 1e-30, 3.4e38], None),
    "u64": ([0, 2**64 - 1, 7], V.UINT64),
    "u8": ([0, 255, 17], V.UINT8),
    "i16": ([-(2**15), 2**15 - 1], V.INT16),
    "f64 from ints": ([1, 2, 3], V.FLOAT64),
    "f32 given": ([1, 2.5], V.FLOAT32),
    "bools": ([True, False, True], None),
    "bytes strings": ([b"ab", b"\xff"], None),
    "nested": ([[1, 2], [3]], None),
}
REFUSED = {
    "mixed str and int": (["a", 1], None),
    "mixed int and float": ([1, 2.5], None),
    "float then int": ([2.5, 1], None),
    "int32 overflow": ([2**31], None),
    "u8 overflow": ([256], V.UINT8),
    "float for an integer type": ([1.5], V.INT32),
    "float32 overflow": ([1e39], None),
    "bad utf-8": (["\ud800"], None),
}


def _kv_bytes(cls: type[gguf.GGUFWriter], path: Path, val: list, sub_type: V | None,
              endian: gguf.GGUFEndian) -> bytes:
    w = cls(path, "llama", endianess=endian)
    try:
        w.add_key_value("test.array", val, V.ARRAY, sub_type=sub_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
    finally:
        w.close()
    return path.read_bytes()


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
@pytest.mark.parametrize("name", list(ARRAYS))
def test_arrays_pack_to_gguf_pys_bytes(tmp_path: Path, name: str, endian: gguf.GGUFEndian) -> None:
    val, sub_type = ARRAYS[name]
    ours = _kv_bytes(FastArrayWriter, tmp_path / "ours.gguf", val, sub_type, endian)
    theirs = _kv_bytes(gguf.GGUFWriter, tmp_path / "theirs.gguf", val, sub_type, endian)
    assert ours == theirs


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_gguf_py_refuses_is_refused(tmp_path: Path, name: str) -> None:
    val, sub_type = REFUSED[name]
    errors = []
    for cls in (gguf.GGUFWriter, FastArrayWriter):
        with pytest.raises(Exception) as caught:
            _kv_bytes(cls, tmp_path / f"{cls.__name__}.gguf", val, sub_type,
                      gguf.GGUFEndian.LITTLE)
        errors.append(type(caught.value))
    assert errors[0] is errors[1]
