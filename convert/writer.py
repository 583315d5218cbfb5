"""gguf-py's writer, with metadata arrays packed whole instead of one value at a time.

``GGUFWriter`` packs an array through one generic call per element: a vocabulary of 201,088
tokens and 446,189 merges (o200k_harmony) is 848k calls, ~5 s of a conversion's ~7 s on the
tiny test checkpoint. Strings and numbers are packed here in a few bulk operations into the
same bytes (the converter's output stays bit-identical to llama.cpp's:
``tests/test_convert_fidelity.py``); anything else goes to gguf-py's own code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gguf
import numpy as np

__all__ = ["FastArrayWriter"]

_V = gguf.GGUFValueType
# GGUF value type -> numpy dtype code (the file's byte order is put before it)
_NUMERIC = {_V.UINT8: "u1", _V.INT8: "i1", _V.UINT16: "u2", _V.INT16: "i2", _V.UINT32: "u4",
            _V.INT32: "i4", _V.UINT64: "u8", _V.INT64: "i8", _V.FLOAT32: "f4", _V.FLOAT64: "f8"}


class FastArrayWriter(gguf.GGUFWriter):
    """``gguf.GGUFWriter`` whose string and number arrays are packed in bulk."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        packed = None
        if vtype == _V.ARRAY and isinstance(val, Sequence) and not isinstance(val, (str, bytes)) \
                and len(val) > 0:
            packed = self._pack_array(val, sub_type)
        if packed is None:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        return (self._pack("I", vtype) if add_vtype else b"") + packed

    def _pack_array(self, val: Sequence[Any], sub_type: gguf.GGUFValueType | None) -> bytes | None:
        """The array's element type, count and elements; None where gguf-py should decide
        (mixed or nested elements, booleans, or a type it would refuse)."""
        ltype = sub_type if sub_type is not None else _V.get_type(val[0])
        order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        if ltype == _V.STRING:
            body = _strings(val, order)
        elif ltype in _NUMERIC:
            body = _numbers(val, order + _NUMERIC[ltype], inferred=sub_type is None)
        else:
            body = None
        return None if body is None else self._pack("I", ltype) + self._pack("Q", len(val)) + body


def _numbers(val: Sequence[Any], dtype: str, inferred: bool) -> bytes | None:
    """The numbers as ``struct`` packs them one by one, or None where it would refuse one
    (a float for an integer type, a value out of the type's range) or gguf-py would (an
    ``inferred`` type, from the first element, that another element does not share)."""
    floating = dtype[1] == "f"
    allowed = (float,) if floating and inferred else (int, float) if floating else (int,)
    if not all(isinstance(x, allowed) and not isinstance(x, bool) for x in val):
        return None
    try:
        with np.errstate(over="ignore"):  # a float32 overflow is found below
            arr = np.array(val, dtype=np.dtype(dtype))
    except OverflowError:
        return None
    if floating and not np.isfinite(arr).all() and np.isfinite(np.array(val, float)).all():
        return None  # a float32 overflow, which struct refuses
    return arr.tobytes()


def _strings(values: Sequence[Any], order: str) -> bytes | None:
    """Each value as GGUF writes a string: its UTF-8 byte count (u64), then the bytes; None
    unless every value is a ``str`` (gguf-py packs or refuses anything else)."""
    try:
        encoded = [s.encode("utf-8") for s in values]
    except AttributeError:  # bytes, or no string at all
        return None
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    text = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    out = np.empty(8 * len(encoded) + text.size, dtype=np.uint8)
    is_text = np.zeros(out.size, dtype=bool)  # where each string's bytes go, after its count
    is_text[np.arange(text.size) + 8 * (np.repeat(np.arange(len(encoded)), lengths) + 1)] = True
    out[is_text] = text
    out[~is_text] = np.frombuffer(lengths.astype(order + "u8").tobytes(), dtype=np.uint8)
    return out.tobytes()
