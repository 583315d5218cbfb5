"""The ``ggufllm`` command: thin click commands over the library.

Known failures (every :class:`~ggufllm.errors.GgufllmError`) print one line
and exit 1; Ctrl-C exits 130. The answer goes to stdout; reasoning, notices
and diagnostics go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from .chunks import Answer, Chunk
from .errors import GgufllmError

__all__ = ["main", "cli"]


class _Group(click.Group):
    """Translates the error tree in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GgufllmError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ggufllm: %(message)s"))
    root = logging.getLogger("ggufllm")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    # llama.cpp's own warnings are noise for a user unless asked for.
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.DEBUG if verbose > 1 else logging.ERROR)


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More diagnostics on stderr (-vv: llama.cpp's log).")
@click.version_option(package_name="ggufllm")
def cli(verbose: int) -> None:
    """Run GGUF models (gpt-oss-20b first) offline through llama.cpp."""
    _setup_logging(verbose)


def _service(model: str | None, max_length: int | None) -> Any:
    from .service import LLMService

    return LLMService(model, max_length=max_length)


def _generation_params(max_tokens: int | None, temperature: float | None,
                       reasoning_effort: str | None, seed: int | None) -> dict[str, Any]:
    """The per-call parameters given on the command line, validated before any loading."""
    from .config import load_settings

    params = dict(max_tokens=max_tokens, temperature=temperature,
                  reasoning_effort=reasoning_effort, seed=seed)
    params = {k: v for k, v in params.items() if v is not None}
    load_settings().generation().updated(**params)  # raises InvalidParameterError / ConfigError
    return params


def _print_stream(chunks: Any, show_reasoning: bool) -> Answer:
    """Streams answer text to stdout (and reasoning to stderr); returns the fold."""
    seen: list[Chunk] = []
    in_reasoning = False
    for chunk in chunks:
        seen.append(chunk)
        if not chunk.text:
            continue
        if chunk.channel == "final":
            if in_reasoning:
                click.echo("", err=True)
                in_reasoning = False
            click.echo(chunk.text, nl=False)
        elif show_reasoning:
            in_reasoning = True
            click.secho(chunk.text, nl=False, err=True, dim=True)
    click.echo("")
    return Answer.from_chunks(seen)


_common = [
    click.option("--model", "-m", type=click.Path(), default=None,
                 help="A .gguf file or a folder of them (default: LLM_MODEL_PATH, then the "
                      "embedded model)."),
    click.option("--max-tokens", type=int, default=None, help="Most tokens to generate."),
    click.option("--temperature", type=float, default=None, help="0 = greedy."),
    click.option("--reasoning-effort", type=click.Choice(["low", "medium", "high"]),
                 default=None, help="gpt-oss reasoning level."),
    click.option("--seed", type=int, default=None, help="Sampling seed (reproducible runs)."),
    click.option("--ctx", "max_length", type=int, default=None,
                 help="Context window in tokens (default: MAX_LENGTH or 4096)."),
    click.option("--show-reasoning", is_flag=True, help="Print gpt-oss reasoning to stderr."),
]


def _with_common(fn: Any) -> Any:
    for option in reversed(_common):
        fn = option(fn)
    return fn


@cli.command()
@click.argument("question")
@click.option("--context", default=None, help="Retrieved passages to answer from.")
@click.option("--context-file", type=click.File("r", encoding="utf-8"), default=None,
              help="Read the context from a file ('-' for stdin).")
@_with_common
@click.option("--no-stream", is_flag=True, help="Print the answer when it is complete.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def ask(question: str, context: str | None, context_file: Any, model: str | None,
        max_tokens: int | None, temperature: float | None, reasoning_effort: str | None,
        seed: int | None, max_length: int | None, show_reasoning: bool, no_stream: bool,
        as_json: bool) -> None:
    """Answer QUESTION, optionally from retrieved CONTEXT."""
    if context is not None and context_file is not None:
        raise click.UsageError("give --context or --context-file, not both")
    if context_file is not None:
        context = context_file.read()
    params = _generation_params(max_tokens, temperature, reasoning_effort, seed)
    with _service(model, max_length) as service:
        if as_json or no_stream:
            answer = service.answer(question, context, **params)
            if as_json:
                click.echo(json.dumps(_answer_json(answer, service), ensure_ascii=False))
                return
            if show_reasoning and answer.reasoning:
                click.secho(answer.reasoning, err=True, dim=True)
            click.echo(answer.text)
        else:
            _print_stream(service.stream(question, context, **params), show_reasoning)


def _answer_json(answer: Answer, service: Any) -> dict[str, Any]:
    info = service.get_model_info()
    return {
        "answer": answer.text,
        "reasoning": answer.reasoning,
        "finish_reason": answer.finish_reason,
        "timings": asdict(answer.timings) if answer.timings else None,
        "model": info.get("model_path"),
    }


@cli.command()
@_with_common
@click.option("--system", default=None, help="Instructions for the whole session.")
def chat(model: str | None, max_tokens: int | None, temperature: float | None,
         reasoning_effort: str | None, seed: int | None, max_length: int | None,
         show_reasoning: bool, system: str | None) -> None:
    """An interactive multi-turn session (empty line or Ctrl-D to quit)."""
    from .harmony import Turn

    params = _generation_params(max_tokens, temperature, reasoning_effort, seed)
    turns: list[Turn] = []
    with _service(model, max_length) as service:
        click.echo(f"model: {service.get_model_info()['model_path']}", err=True)
        while True:
            try:
                line = click.prompt(">>>", prompt_suffix=" ", default="", show_default=False,
                                    err=True)
            except (EOFError, click.Abort):
                break
            if not line.strip() or line.strip() in ("/bye", "/exit"):
                break
            turns.append(Turn("user", line))
            answer = _print_stream(service.chat_stream(turns, **params), show_reasoning)
            turns.append(Turn("assistant", answer.text))


@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(model: Path, as_json: bool) -> None:
    """Describe a GGUF file without loading it."""
    from .gguf_file import read_gguf_header

    s = read_gguf_header(model)
    facts = {
        "path": str(model), "file_size": s.file_size, "gguf_version": s.version,
        "architecture": s.architecture, "name": s.metadata.get("general.name"),
        "parameters": s.n_params, "context_length": s.context_length,
        "chat_template": s.has_chat_template, "tensors": len(s.tensors),
        "tensor_types": [{"type": t, "count": n, "bytes": b} for t, n, b in s.type_table()],
    }
    if as_json:
        click.echo(json.dumps(facts))
        return
    for key in ("path", "name", "architecture", "gguf_version", "context_length",
                "chat_template", "tensors"):
        click.echo(f"{key:16} {facts[key]}")
    click.echo(f"{'parameters':16} {s.n_params:,} ({s.n_params / 1e9:.2f} B)")
    click.echo(f"{'file_size':16} {s.file_size:,} bytes ({s.file_size / 1e9:.2f} GB)")
    click.echo("tensor types:")
    for t, n, b in s.type_table():
        click.echo(f"  {t:8} {n:6} tensors {b / 1e6:12.1f} MB")


_TYPES = ["q8_0", "q4_k_m", "bf16", "f16", "f32"]
_EXPERTS = ["mxfp4", "q8_0", "bf16", "f16", "f32"]


@cli.command("convert")
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
    """Convert a Hugging Face gpt-oss checkpoint (folder or cached repo id) to GGUF."""
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
        from .errors import OutputExistsError

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


@cli.command("verify")
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--reference", required=True, help="The source checkpoint folder.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per tensor.")
@click.option("--logits", is_flag=True,
              help="Also compare llama.cpp's logits with transformers' on 64 tokens "
                   "(small models; needs the 'reference' extra).")
def verify_cmd(gguf_file: Path, reference: str, as_json: bool, logits: bool) -> None:
    """Per-tensor fidelity of GGUF_FILE against its source checkpoint."""
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


from .server.cli import bench, serve  # noqa: E402  (the server's commands live with it)

cli.add_command(serve)
cli.add_command(bench)

convert_command = _Group(commands={"convert": convert_cmd}).commands["convert"]


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="ggufllm")


if __name__ == "__main__":
    main()
