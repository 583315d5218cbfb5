"""``ggufllm convert`` and ``ggufllm verify``: the converter's commands (moved as they were)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

__all__ = ["convert_cmd", "verify_cmd"]


_TYPES = ["q8_0", "q4_k_m", "bf16", "f16", "f32"]
_EXPERTS = ["mxfp4", "q8_0", "bf16", "f16", "f32"]


@click.command("convert")
@click.argument("src")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="The .gguf file to write.")
@click.option("--type", "out_type", type=click.Choice(_TYPES), default="q8_0", show_default=True,
              help="Encoding of the non-expert matrices.")
@click.option("--experts", type=click.Choice(_EXPERTS), default="mxfp4", show_default=True,
              help="Encoding of the expert matrices (mxfp4 keeps the checkpoint's codes).")
@click.option("--dry-run", is_flag=True, help="Print the per-tensor plan and the size; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--download", is_flag=True, help="Allow fetching SRC from the Hugging Face hub.")
def convert_cmd(src: str, out: Path | None, out_type: str, experts: str, dry_run: bool,
                force: bool, download: bool) -> None:
    """Convert a Hugging Face gpt-oss checkpoint (folder or cached repo id) to GGUF.

    \b
    Example:
      ggufllm convert PATH/TO/gpt-oss-20b -o models/llm/gpt-oss-20b-Q8_0.gguf
    """
    from convert import convert, load_plan
    from convert.quant import n_bytes

    if dry_run:
        _, _, jobs = load_plan(src, out_type, experts, download=download)
        total = 0
        for j in jobs:
            size = n_bytes(j.qtype, j.shape)
            total += size
            click.echo(f"{j.name:32} {str(list(j.shape)):22} {j.source_type:6} -> "
                       f"{j.qtype.name:6} {size:>14,}")
        click.echo(f"{len(jobs)} tensors, {total:,} bytes of tensor data "
                   f"({total / 1e9:.2f} GB) + metadata")
        return
    if out is None:
        raise click.UsageError("give -o/--output (or --dry-run)")
    if out.exists() and not force:
        from ..errors import OutputExistsError

        raise OutputExistsError(str(out))
    from tqdm import tqdm

    _, _, jobs = load_plan(src, out_type, experts, download=download)
    total = sum(n_bytes(j.qtype, j.shape) for j in jobs)
    with tqdm(total=total, unit="B", unit_scale=True, desc=out.name, file=sys.stderr) as bar:
        def progress(name: str, size: int) -> None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(size)

        result = convert(src, out, out_type, experts, force=force, download=download,
                         progress=progress)
    click.echo(f"wrote {result.path} ({result.path.stat().st_size:,} bytes, {result.n_tensors} "
               f"tensors; peak RSS {result.peak_rss_bytes / 1e9:.2f} GB)", err=True)


@click.command("verify")
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--reference", required=True, help="The source checkpoint folder.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per tensor.")
@click.option("--logits", is_flag=True,
              help="Also compare llama.cpp's logits with transformers' on 64 tokens "
                   "(small models; needs the 'reference' extra).")
def verify_cmd(gguf_file: Path, reference: str, as_json: bool, logits: bool) -> None:
    """Per-tensor fidelity of GGUF_FILE against its source checkpoint.

    \b
    Example:
      ggufllm verify models/llm/gpt-oss-20b-Q8_0.gguf --reference PATH/TO/gpt-oss-20b
    """
    from convert import verify

    failed = 0
    for r in verify(gguf_file, reference):
        failed += not r.ok
        if as_json:
            click.echo(json.dumps(asdict(r)))
        else:
            exact = {True: "bit-exact", False: "MISMATCH", None: ""}[r.bit_exact]
            click.echo(f"{r.name:32} {r.qtype:6} rel {r.rel_error:9.2e} max {r.max_abs_error:9.2e} "
                       f"{exact}")
    if logits:
        from convert.logits import compare_logits

        rel, same = compare_logits(gguf_file, reference)
        click.echo(f"logits vs transformers (64 tokens): relative error {rel:.2e}, "
                   f"same argmax at {same:.0%} of positions")
    if failed:
        click.echo(f"error: {failed} tensor(s) differ from the source", err=True)
        sys.exit(1)
