"""``ggufllm doctor`` and ``ggufllm backend install``: thin click commands over :mod:`ggufllm.gpu`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

__all__ = ["backend", "doctor"]

MiB = 1024 * 1024


def doctor_report(model: str | None = None, max_length: int | None = None) -> dict[str, Any]:
    """Everything ``doctor`` shows, as data.

    Args:
        model: a GGUF file or folder; None resolves the configured one.
        max_length: the context window to plan for; None uses ``MAX_LENGTH``.
    """
    import llama_cpp.llama_cpp as lib

    from ..config import load_settings
    from ..errors import GgufllmError, KernelSelfTestError
    from ..gguf_file import read_gguf_header
    from ..native.kernels import decide_extra_buffers
    from ..native.runtime import default_threads
    from ..resolve import resolve_model
    from .devices import backends, cpu_features, devices, extra_buffer_types, versions
    from .placement import placement_for_settings

    settings = load_settings(max_length=max_length)
    devs = devices()
    report: dict[str, Any] = {
        "versions": versions(), "backends": backends(),
        "gpu_offload_compiled_in": bool(lib.llama_supports_gpu_offload()),
        "devices": [{"name": d.name, "description": d.description, "kind": d.kind,
                     "free_mib": round(d.free_bytes / MiB), "total_mib": round(d.total_bytes / MiB)}
                    for d in devs],
        "settings": {"n_gpu_layers": settings.n_gpu_layers, "cpu_moe": settings.cpu_moe,
                     "n_cpu_moe": settings.n_cpu_moe, "max_length": settings.max_length,
                     "n_parallel": settings.n_parallel, "kv_cache_type": settings.kv_cache_type,
                     "cpu_extra_buffers": settings.cpu_extra_buffers},
        "cpu": {"features": sorted(cpu_features()), "extra_buffer_types": extra_buffer_types()},
    }
    report["gpu"] = any(d.is_gpu for d in devs) and report["gpu_offload_compiled_in"]
    try:
        resolved = resolve_model(model, env_path=settings.llm_model_path,
                                 use_quantization=settings.use_quantization,
                                 load_in_8bit=settings.load_in_8bit,
                                 load_in_4bit=settings.load_in_4bit)
        report["model"] = str(resolved.path)
        report["placement"] = placement_for_settings(settings, resolved.path).as_dict()
        # the verdict the next load will use (remembered, or tested now in a child process)
        try:
            report["cpu"]["self_test"] = decide_extra_buffers(
                settings.cpu_extra_buffers, read_gguf_header(resolved.path),
                settings.n_threads or default_threads()).as_info()
        except KernelSelfTestError as exc:  # CPU_EXTRA_BUFFERS=on on a CPU that fails it
            report["cpu"]["self_test_error"] = str(exc)
    except GgufllmError as exc:
        report["model"] = None
        report["model_error"] = str(exc)
    return report


def _print_report(r: dict[str, Any]) -> None:
    v = r["versions"]
    click.echo(f"ggufllm {v['ggufllm']}, llama-cpp-python {v['llama-cpp-python']}, "
               f"ggml {v['ggml']}, llama.cpp commit {v['llama.cpp commit']}")
    click.echo(f"backends compiled in: {', '.join(r['backends']) or 'none'}")
    for d in r["devices"]:
        click.echo(f"  {d['name']:<10} {d['kind']:<5} {d['description']}: "
                   f"{d['free_mib'] / 1024:.1f} GiB free of {d['total_mib'] / 1024:.1f} GiB")
    if not r["gpu"]:
        why = ("this llama-cpp-python build has no GPU backend" if not r["gpu_offload_compiled_in"]
               else "the GPU backend found no device")
        click.echo(f"No GPU: {why}; everything runs on the CPU. "
                   "For a CUDA build: ggufllm backend install --preset cuda")
    c = r["cpu"]
    click.echo(f"CPU kernels: {', '.join(c['features']) or 'none reported'}; extra buffer types: "
               f"{', '.join(c['extra_buffer_types']) or 'none'}")
    s = r["settings"]
    click.echo(f"settings: CPU_EXTRA_BUFFERS={s['cpu_extra_buffers']} "
               f"N_GPU_LAYERS={s['n_gpu_layers']} CPU_MOE={s['cpu_moe']} "
               f"N_CPU_MOE={s['n_cpu_moe']} MAX_LENGTH={s['max_length']} "
               f"N_PARALLEL={s['n_parallel']} KV_CACHE_TYPE={s['kv_cache_type']}")
    if r.get("model") is None:
        click.echo(f"model: none ({r.get('model_error')})")
        return
    p = r["placement"]
    click.echo(f"model: {r['model']}")
    if c.get("self_test_error"):
        click.echo(f"CPU kernel self-test: {c['self_test_error']}")
    t = c.get("self_test")
    if t:
        use = "used" if t["use_extra_buffers"] else "NOT used"
        why = f" ({t['reason']})" if t["reason"] else ""
        tested = f"{', '.join(t['weight_types'])}: " if t["weight_types"] else ""
        click.echo(f"CPU kernel self-test: {tested}{t['status']}{why}; extra buffers {use}"
                   + (" (remembered)" if t["cached"] else f" (took {t['seconds']:.2f} s)"))
    click.echo(f"placement: {p['reason']} (n_gpu_layers={p['n_gpu_layers']}, "
               f"cpu_moe={p['cpu_moe']}, n_cpu_moe={p['n_cpu_moe']})")
    e = p.get("estimate")
    if e:
        h, d = e["host_mib"], e["device_mib"]
        click.echo(f"predicted host: {h['total']:.0f} MiB (weights {h['weights']:.0f}, "
                   f"KV {h['kv']:.0f}, compute {h['compute']:.0f})")
        click.echo(f"predicted GPU:  {d['total']:.0f} MiB (weights {d['weights']:.0f}, "
                   f"KV {d['kv']:.0f}, compute {d['compute']:.0f}); {e['layers_on_gpu']} layers "
                   f"on the GPU, {e['layers_with_experts_on_cpu']} of them with experts on the CPU")
        click.echo(f"layers: {'; '.join(e['layers'])}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--model", "-m", default=None, help="A .gguf file or folder (default: LLM_MODEL_PATH).")
@click.option("--max-length", type=int, default=None, help="Context window to plan for.")
def doctor(as_json: bool, model: str | None, max_length: int | None) -> None:
    """Versions, backends, devices and where the model would go. Exits 0 without a GPU."""
    report = doctor_report(model, max_length)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)


@click.group()
def backend() -> None:
    """Rebuild llama-cpp-python for a GPU backend (CUDA, Vulkan, Metal) or a portable CPU build."""


@backend.command("install")
@click.option("--preset", required=True, help="A configure preset of CMakePresets.json (cpu, "
              "cpu-portable, cpu-avx2, cuda, cuda-sm80/86/89/90, vulkan, metal).")
@click.option("--dry-run", is_flag=True, help="Print the command and its environment; build nothing.")
@click.option("--source", default=None, help="Build from this sdist or folder (offline).")
@click.option("--no-build-isolation", is_flag=True,
              help="Use this environment's scikit-build-core (no download).")
@click.option("--presets-file", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option("--log", "log_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Build log (default: ./ggufllm-backend-PRESET.log).")
def install(preset: str, dry_run: bool, source: str | None, no_build_isolation: bool,
            presets_file: Path | None, log_path: Path | None) -> None:
    """Rebuild the pinned llama-cpp-python with a preset's CMake cache variables."""
    from ..errors import ConfigError
    from .install import preflight, run_build
    from .presets import build_command, load_presets

    presets = load_presets(presets_file)
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(presets)}", "preset")
    chosen = presets[preset]
    cmd, env = build_command(chosen, source, not no_build_isolation)
    if dry_run:
        for k, v in env.items():
            click.echo(f"{k}={v}")
        click.echo(" ".join(cmd))
        return
    errors, warnings = preflight(chosen)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    if errors:
        raise ConfigError("; ".join(errors), "preset")
    log = log_path or Path(f"ggufllm-backend-{preset}.log").resolve()
    click.echo(f"building llama-cpp-python with preset {preset} ({chosen.cmake_args}); "
               f"log: {log}", err=True)
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        click.echo(f"\r  compiling [{done}/{total}] {time.monotonic() - start:.0f} s", err=True,
                   nl=False)

    result = run_build(chosen, log, source=source, build_isolation=not no_build_isolation,
                       on_progress=progress)
    click.echo("", err=True)
    if not result.ok:
        click.echo(f"build failed; see {result.log}", err=True)
        for cause in result.causes or ("no known cause found in the log",):
            click.echo(f"  - {cause}", err=True)
        sys.exit(1)
    state = "GPU offload is compiled in" if result.gpu_offload else "CPU only"
    click.echo(f"done in {time.monotonic() - start:.0f} s: {state} "
               f"(llama_supports_gpu_offload() in a fresh process)")
