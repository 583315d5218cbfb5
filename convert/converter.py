"""Hugging Face checkpoint -> GGUF, one tensor at a time, written atomically.

The output goes to a file of its own beside ``OUT`` (``OUT.<random>.partial``: two runs
to one output never share one); it is fsynced and renamed over ``OUT`` only once
complete, so Ctrl-C, a kill or a full disk never leave a file at ``OUT``, and a reader
of ``OUT`` sees a whole file, never a mix of two runs.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ggufllm.errors import ConversionError, OutputExistsError

from . import gpt_oss
from .checkpoint import Checkpoint, fsync_dir, resolve_source
from .quant import FILE_TYPES, ExpertType, OutType, byte_shape, n_bytes
from .tokenizer import read_vocab
from .writer import FastArrayWriter

__all__ = ["ConvertResult", "convert", "load_plan", "ARCHITECTURES"]

logger = logging.getLogger(__name__)

# Hugging Face architecture name -> module with check_config/check_tensors/write_metadata/plan
ARCHITECTURES = {gpt_oss.HF_ARCHITECTURE: gpt_oss}
QUANTIZATION_VERSION = 2


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    n_tensors: int
    n_bytes: int
    peak_rss_bytes: int
    plan: list[gpt_oss.TensorJob]


def _architecture(ckpt: Checkpoint) -> Any:  # an architecture module (see ARCHITECTURES)
    names = ckpt.config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ConversionError(f"architecture {names or 'unknown'} is not supported; supported: "
                          f"{', '.join(sorted(ARCHITECTURES))}")


def load_plan(src: str | Path, out_type: OutType | str = OutType.Q8_0,
              experts: ExpertType | str = ExpertType.MXFP4, *,
              download: bool = False) -> tuple[Checkpoint, Any, list[gpt_oss.TensorJob]]:
    """Reads and validates the source; returns the checkpoint, its architecture and the plan.

    Raises:
        ConversionError: every problem found, in one error.
    """
    ckpt = Checkpoint(resolve_source(str(src), download=download))
    arch = _architecture(ckpt)
    problems = arch.check_config(ckpt.config)
    if not problems:
        problems = arch.check_tensors(ckpt)
    if problems:
        raise ConversionError(problems)
    return ckpt, arch, arch.plan(ckpt, OutType(out_type), ExpertType(experts))


def _write_vocab(w: gguf.GGUFWriter, ckpt: Checkpoint) -> None:
    vocab = read_vocab(ckpt.tokenizer_json, ckpt.tokenizer_config, ckpt.config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "pad": w.add_pad_token_id,
               "unk": w.add_unk_token_id}
    for role, token_id in vocab.special_ids.items():
        setters[role](token_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if ckpt.chat_template:
        w.add_chat_template(ckpt.chat_template)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def convert(src: str | Path, out: str | Path, out_type: OutType | str = OutType.Q8_0,
            experts: ExpertType | str = ExpertType.MXFP4, *, force: bool = False,
            download: bool = False,
            progress: Callable[[str, int], None] | None = None) -> ConvertResult:
    """Converts a checkpoint folder to one GGUF file.

    Args:
        src: the checkpoint folder (or a repo id in the local Hugging Face cache).
        out: the ``.gguf`` to write.
        out_type: encoding of the non-expert matrices.
        experts: encoding of the expert matrices (``mxfp4`` keeps them bit for bit).
        force: overwrite ``out`` if it exists.
        progress: called after each tensor with its name and byte count.

    Raises:
        ConversionError: invalid input (every problem listed) or a write failure.
        OutputExistsError: ``out`` exists and ``force`` is False.
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(str(out))
    ckpt, arch, jobs = load_plan(src, out_type, experts, download=download)
    out.parent.mkdir(parents=True, exist_ok=True)
    w: gguf.GGUFWriter | None = None
    partial: Path | None = None
    try:
        partial = _new_partial(out)
        w = FastArrayWriter(partial, gguf.MODEL_ARCH_NAMES[arch.ARCH])
        _write_metadata(w, ckpt, arch, OutType(out_type), ExpertType(experts))
        _write_tensor_infos(w, jobs)
        w.write_header_to_file()  # the writer wants every tensor described first
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total = _write_tensor_data(w, jobs, progress)
        w.fout[0].flush()  # type: ignore[index]
        os.fsync(w.fout[0].fileno())  # type: ignore[index]
        w.close()
        _publish(partial, out, force)
        fsync_dir(out.parent)
    except OSError as exc:
        _abandon(w, partial)
        raise ConversionError(f"writing {out} failed: {exc.strerror or exc}") from None
    except BaseException:
        _abandon(w, partial)
        raise
    return ConvertResult(out, len(jobs), total, _peak_rss(), jobs)


def _write_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, arch: Any, out_type: OutType,
                    experts: ExpertType) -> None:
    w.add_name(ckpt.config.get("_name_or_path") or ckpt.folder.name)
    w.add_type("model")
    w.add_quantization_version(QUANTIZATION_VERSION)
    w.add_file_type(FILE_TYPES[out_type])
    w.add_string("general.source.url", str(ckpt.folder))
    w.add_string("ggufllm.source.sha256", ckpt.manifest_sha256())
    w.add_string("ggufllm.experts", experts.value)
    arch.write_metadata(w, ckpt.config)
    _write_vocab(w, ckpt)


def _write_tensor_infos(w: gguf.GGUFWriter, jobs: list[gpt_oss.TensorJob]) -> None:
    floats = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    for job in jobs:
        size = n_bytes(job.qtype, job.shape)
        if job.qtype in floats:
            w.add_tensor_info(job.name, job.shape, np.dtype(floats[job.qtype]), size)
        else:  # everything else is described by its bytes and its GGML type
            w.add_tensor_info(job.name, byte_shape(job.qtype, job.shape), np.dtype(np.uint8),
                              size, raw_dtype=job.qtype)


def _write_tensor_data(w: gguf.GGUFWriter, jobs: list[gpt_oss.TensorJob],
                       progress: Callable[[str, int], None] | None) -> int:
    """Produces and writes one tensor at a time; returns the bytes written."""
    total = 0
    for job in jobs:
        data = job.produce()
        if data.dtype == np.uint16:  # BF16 bits: the writer wants bytes
            data = data.view(np.uint8)
        w.write_tensor_data(np.ascontiguousarray(data))
        total += data.nbytes
        del data
        if progress is not None:
            progress(job.name, n_bytes(job.qtype, job.shape))
    return total


def _new_partial(out: Path) -> Path:
    """A new empty file of this run's own beside ``out``, made as ``mkstemp`` makes one
    (a random name, ``O_EXCL``) but with the mode the umask gives a new file: a model is
    read by whoever serves it, where ``mkstemp`` would leave it 0600."""
    while True:
        partial = out.with_name(f"{out.name}.{secrets.token_hex(4)}.partial")
        try:
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return partial


def _publish(partial: Path, out: Path, force: bool) -> None:
    """Moves the finished file to ``out`` in one step (a reader sees the old file or the whole
    new one). Without ``force``, ``out`` must still not exist: another run may have finished
    first since the check at the start, and a rename would replace its file, a link does not.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is False.
    """
    if force:
        os.replace(partial, out)
        return
    try:
        os.link(partial, out)
    except FileExistsError:
        raise OutputExistsError(str(out)) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        # no hard links on this file system (FAT, some network mounts): check, then rename
        if out.exists():
            raise OutputExistsError(str(out)) from None
        os.replace(partial, out)
        return
    partial.unlink()


def _abandon(w: gguf.GGUFWriter | None, partial: Path | None) -> None:
    """Closes a half-written output without flushing more into it, and deletes it."""
    for f in (w.fout or []) if w is not None else []:
        try:
            f.close()
        except OSError:  # the disk that failed the write may fail the flush too
            pass
    if partial is not None:
        partial.unlink(missing_ok=True)
