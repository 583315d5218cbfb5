"""``ggufllm models`` and ``ggufllm info``: what is on disk, read from headers only."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import click

from ..config import load_settings
from ..errors import GgufllmError
from ..gguf_file import GGUFSummary, read_gguf_header
from ..resolve import find_models, quantization_of, resolve_model
from .common import verbosity_options

__all__ = ["models", "info"]


def _quantization(summary: GGUFSummary) -> str:
    """From ``general.file_type`` (what the file is), else the file name."""
    file_type = summary.metadata.get("general.file_type")
    if file_type is not None:
        try:
            from gguf import LlamaFileType

            return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    return quantization_of(summary.path)


def _would_use() -> Path | None:
    """The file `ggufllm ask` would load now (None when there is none)."""
    s = load_settings()
    resolve_logger = logging.getLogger("ggufllm.resolve")
    level = resolve_logger.level
    resolve_logger.setLevel(logging.ERROR)  # the listing marks the fallback itself
    try:
        return resolve_model(None, env_path=s.llm_model_path, use_quantization=s.use_quantization,
                             load_in_8bit=s.load_in_8bit, load_in_4bit=s.load_in_4bit).path
    except GgufllmError:
        return None
    finally:
        resolve_logger.setLevel(level)


def _row(path: Path) -> dict[str, Any]:
    try:
        summary = read_gguf_header(path, probe=False)
    except GgufllmError as exc:
        return {"path": str(path), "size": path.stat().st_size, "quantization": None,
                "architecture": None, "context_length": None, "problem": str(exc)}
    return {"path": str(path), "size": summary.file_size, "quantization": _quantization(summary),
            "architecture": summary.architecture, "context_length": summary.context_length,
            "problem": None}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model.")
@verbosity_options
def models(as_json: bool) -> None:
    """List the GGUF models under models/llm/ and LLM_MODEL_PATH.

    The one `ggufllm ask` would use is marked with *.

    \b
    Example:
      ggufllm models
    """
    settings = load_settings()
    paths = find_models(settings.llm_model_path)
    chosen = _would_use()
    def same(a: Path, b: Path | None) -> bool:
        return b is not None and os.path.abspath(a) == os.path.abspath(b)

    if chosen is not None and not any(same(p, chosen) for p in paths):
        paths.append(chosen)  # the embedded default model
    rows = [_row(p) | {"default": same(p, chosen)} for p in paths]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo("no GGUF model found in models/llm/ or LLM_MODEL_PATH", err=True)
        return
    click.echo(f"  {'SIZE':>8}  {'QUANT':10} {'ARCH':10} {'CTX':>7}  PATH")
    for r in rows:
        mark = "*" if r["default"] else " "
        if r["problem"]:
            click.echo(f"{mark} {r['size'] / 1e9:7.2f}G  {'?':10} {'?':10} {'':>7}  {r['path']}  "
                       f"({r['problem']})")
            continue
        click.echo(f"{mark} {r['size'] / 1e9:7.2f}G  {r['quantization']:10} "
                   f"{r['architecture']:10} {r['context_length'] or '?':>7}  {r['path']}")
    if chosen is None:
        click.echo("(none of these would be used: check LLM_MODEL_PATH)", err=True)


@click.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@verbosity_options
def info(model: Path | None, as_json: bool) -> None:
    """Describe a GGUF file (or the one a folder holds) from its header, without loading it
    (default: the one `ask` would use).

    \b
    Examples:
      ggufllm info
      ggufllm info models/llm/gpt-oss-20b-Q8_0.gguf --json
    """
    settings = load_settings()
    model = resolve_model(model, env_path=settings.llm_model_path,
                          use_quantization=settings.use_quantization,
                          load_in_8bit=settings.load_in_8bit,
                          load_in_4bit=settings.load_in_4bit).path
    s = read_gguf_header(model, probe=False)
    facts = {
        "path": str(model), "file_size": s.file_size, "gguf_version": s.version,
        "architecture": s.architecture, "name": s.metadata.get("general.name"),
        "quantization": _quantization(s),
        "parameters": s.n_params, "context_length": s.context_length,
        "chat_template": s.has_chat_template, "tensors": len(s.tensors),
        "tensor_types": [{"type": t, "count": n, "bytes": b} for t, n, b in s.type_table()],
    }
    if as_json:
        click.echo(json.dumps(facts))
        return
    for key in ("path", "name", "architecture", "quantization", "gguf_version", "context_length",
                "chat_template", "tensors"):
        click.echo(f"{key:16} {facts[key]}")
    click.echo(f"{'parameters':16} {s.n_params:,} ({s.n_params / 1e9:.2f} B)")
    click.echo(f"{'file_size':16} {s.file_size:,} bytes ({s.file_size / 1e9:.2f} GB)")
    click.echo("tensor types:")
    for t, n, b in s.type_table():
        click.echo(f"  {t:8} {n:6} tensors {b / 1e6:12.1f} MB")
