"""A Hugging Face checkpoint folder, read lazily and checked up front.

Safetensors are parsed here (an 8-byte header length, a JSON header, then raw
data) rather than through a framework: numpy has no bfloat16, and the header
is exactly what must be validated — dtypes, shapes, offsets inside the file,
no overlaps — before a single tensor is read. Tensors are memory-mapped and
read one at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ggufllm.errors import ConversionError

__all__ = ["Checkpoint", "SourceTensor", "resolve_source"]

# safetensors dtype -> (numpy dtype used to hold the raw bytes, bytes per element)
_DTYPES: dict[str, tuple[np.dtype, int]] = {
    "BF16": (np.dtype("<u2"), 2), "F16": (np.dtype("<f2"), 2), "F32": (np.dtype("<f4"), 4),
    "U8": (np.dtype("u1"), 1), "I8": (np.dtype("i1"), 1), "I32": (np.dtype("<i4"), 4),
    "I64": (np.dtype("<i8"), 8), "F64": (np.dtype("<f8"), 8),
}
_MAX_HEADER = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor lives in a shard."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset
    end: int

    def array(self) -> np.ndarray:
        """The raw values, memory-mapped (BF16 comes back as uint16 bit patterns)."""
        np_dtype, _ = _DTYPES[self.dtype]
        count = (self.end - self.start) // np_dtype.itemsize
        mm = np.memmap(self.file, dtype=np_dtype, mode="r", offset=self.start, shape=(count,))
        return mm.reshape(self.shape)

    def float32(self, rows: slice | None = None) -> np.ndarray:
        """The values (of the first-axis ``rows``, all by default) as float32 (exact for
        BF16/F16)."""
        raw = self.array() if rows is None else self.array()[rows]
        if self.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)


def resolve_source(src: str, *, download: bool = False) -> Path:
    """A local folder, or a repo id found in the local Hugging Face cache.

    Raises:
        ConversionError: neither a folder nor a cached repo (and no ``download``).
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{src} is a file; give the checkpoint folder")
    if "/" not in src or src.startswith((".", "/")):
        raise ConversionError(f"{src}: no such folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(src, local_files_only=not download))
    except LocalEntryNotFoundError:
        raise ConversionError(f"{src} is not in the local Hugging Face cache; pass --download "
                              f"to fetch it, or give a folder") from None


def _read_header(path: Path, problems: list[str]) -> dict[str, SourceTensor]:
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            problems.append(f"{path.name}: too short for a safetensors header")
            return {}
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            problems.append(f"{path.name}: header length {n} is larger than the file allows")
            return {}
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{path.name}: header is not valid JSON ({exc})")
            return {}
    if not isinstance(header, dict):
        problems.append(f"{path.name}: header is not a JSON object")
        return {}
    base = 8 + n
    out: dict[str, SourceTensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{path.name}: {name}: malformed entry")
            continue
        if dtype not in _DTYPES:
            problems.append(f"{path.name}: {name}: unsupported dtype {dtype}")
            continue
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            problems.append(f"{path.name}: {name}: bad shape {list(shape)}")
            continue
        expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]
        if not (isinstance(a, int) and isinstance(b, int)) or b - a != expected or a < 0:
            problems.append(f"{path.name}: {name}: offsets {a}..{b} do not hold {dtype} "
                            f"{list(shape)} ({expected} bytes)")
            continue
        if base + b > size:
            problems.append(f"{path.name}: {name}: data ends at {base + b}, past the end of "
                            f"the file ({size} bytes)")
            continue
        spans.append((a, b, name))
        out[name] = SourceTensor(name, dtype, shape, path, base + a, base + b)
    spans.sort()
    for (_, end0, n0), (start1, _, n1) in zip(spans, spans[1:], strict=False):
        if start1 < end0:
            problems.append(f"{path.name}: {n0} and {n1} overlap")
    return out


class Checkpoint:
    """A checkpoint folder: config, tokenizer files and every tensor's location.

    Raises:
        ConversionError: listing every problem found in the folder.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        problems: list[str] = []
        self.config = self._json("config.json", problems, required=True)
        self.tokenizer_json = folder / "tokenizer.json"
        if not self.tokenizer_json.is_file():
            problems.append("tokenizer.json is missing")
        self.tokenizer_config = self._json("tokenizer_config.json", problems, required=False)
        template = folder / "chat_template.jinja"
        self.chat_template = (template.read_text(encoding="utf-8") if template.is_file()
                              else self.tokenizer_config.get("chat_template"))
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            problems.append("no *.safetensors files")
        self.tensors: dict[str, SourceTensor] = {}
        for shard in shards:
            for name, t in _read_header(shard, problems).items():
                if name in self.tensors:
                    problems.append(f"{name} appears in {self.tensors[name].file.name} and "
                                    f"{shard.name}")
                self.tensors[name] = t
        self._check_index(problems)
        if problems:
            raise ConversionError(problems)

    def _json(self, name: str, problems: list[str], *, required: bool) -> dict[str, Any]:
        path = self.folder / name
        if not path.is_file():
            if required:
                problems.append(f"{name} is missing")
            return {}
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{name} is not valid JSON ({exc})")
            return {}
        if not isinstance(value, dict):
            problems.append(f"{name} is not a JSON object")
            return {}
        return value

    def _check_index(self, problems: list[str]) -> None:
        index = self.folder / "model.safetensors.index.json"
        if not index.is_file():
            return
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (KeyError, ValueError, TypeError):
            problems.append("model.safetensors.index.json has no weight_map")
            return
        for name, shard in weight_map.items():
            t = self.tensors.get(name)
            if t is None:
                problems.append(f"index lists {name} in {shard}, which does not hold it")
            elif t.file.name != shard:
                problems.append(f"index puts {name} in {shard}, found in {t.file.name}")

    def manifest_sha256(self) -> str:
        """A hash of the source: the small files whole, each shard's header and size.

        Hashing 13 GB of weights again would double the conversion's reading; a
        shard's header pins every tensor's name, dtype, shape and offset.
        """
        h = hashlib.sha256()
        for path in sorted(self.folder.iterdir()):
            if not path.is_file():
                continue
            h.update(path.name.encode() + b"\0")
            if path.suffix == ".safetensors":
                with path.open("rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    h.update(f.read(n))
                h.update(str(path.stat().st_size).encode())
            elif path.suffix in (".json", ".jinja", ".txt", ".model"):
                h.update(path.read_bytes())
        return h.hexdigest()

    def __iter__(self) -> Iterator[SourceTensor]:
        return iter(self.tensors.values())

    def total_bytes(self) -> int:
        return sum(t.end - t.start for t in self.tensors.values())


def fsync_dir(path: Path) -> None:
    """Makes a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
