"""The CPU kernel self-test: may this llama.cpp build use its extra buffer types on this CPU?

llama.cpp repacks quantized weights into "extra buffer types" (``CPU_REPACK``:
interleaved layouts, faster on AVX2 / AVX-512; ``AMX`` on Intel Xeons with AMX)
and runs other kernels on them. Some of those kernels crash on some CPUs (the
AMX one dies with SIGSEGV on virtualized Sapphire/Granite Rapids Xeons, llama.cpp
#20824), and nobody can list the ones that will crash next. So before the first
decode of a build on a CPU, a child process decodes a tiny model made of the real
model's weight types (:mod:`.kernel_model`) with the extra buffers on. The
verdict is remembered per llama.cpp build x CPU feature flags x weight types under
the user cache folder:

- passed (the child decoded and every logit was finite): load with the extra buffers;
- failed (the child died by a signal, hung, produced a non-finite logit or could
  not run): load without them (``use_extra_bufts = false``), with one notice line.

``CPU_EXTRA_BUFFERS`` chooses: ``auto`` (the default, as above), ``on`` (use them;
a failed self-test is a :class:`~ggufllm.errors.KernelSelfTestError`), ``off``
(never; no test), ``force`` (use them without a test: the user's choice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ..config import ExtraBuffersMode
from ..errors import KernelSelfTestError
from ..gguf_file import GGUFSummary

__all__ = ["ExtraBuffersMode", "KernelVerdict", "decide_extra_buffers", "extra_buffers_for",
           "run_self_test",
           "cpu_flags", "build_identity", "FAULT_ENV", "TIMEOUT_ENV"]

logger = logging.getLogger(__name__)

FAULT_ENV = "GGUFLLM_KERNEL_FAULT"  # tests: signal | hang | nan
TIMEOUT_ENV = "GGUFLLM_KERNEL_TIMEOUT"
# A healthy child finishes in about a second; one still running after this is hung.
TIMEOUT_S = 60.0
_CHILD = Path(__file__).with_name("_kernel_child.py")
_HOW = ("CPU_EXTRA_BUFFERS=off skips the test, CPU_EXTRA_BUFFERS=force uses them anyway")


@dataclass(frozen=True)
class KernelVerdict:
    """What was decided about the extra buffer types for one load.

    Attributes:
        mode: the ``CPU_EXTRA_BUFFERS`` setting.
        use_extra_buffers: what the model is loaded with.
        status: ``passed``, ``failed``, ``not tested`` (off / force / nothing to test).
        reason: why, in a few words (the signal, "non-finite logits", ...).
        weight_types: the weight types the test covered.
        buffers: the buffer types the test model was placed in (``CPU_REPACK``, ``AMX``...).
        seconds: what the test cost (0 when the verdict came from the cache).
        cached: the verdict was remembered from an earlier run.
    """

    mode: ExtraBuffersMode
    use_extra_buffers: bool
    status: Literal["passed", "failed", "not tested"]
    reason: str = ""
    weight_types: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()
    seconds: float = 0.0
    cached: bool = False

    def as_info(self) -> dict[str, object]:
        d = asdict(self)
        d["weight_types"], d["buffers"] = list(self.weight_types), list(self.buffers)
        return d


def cpu_flags() -> tuple[str, ...]:
    """The CPU's feature flags (``/proc/cpuinfo``), or what ``platform`` says elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return tuple(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    return (platform.machine(), platform.processor())


def build_identity() -> str:
    """llama-cpp-python's version and the identity of its shared libraries (path, size, time)."""
    import llama_cpp

    parts = [getattr(llama_cpp, "__version__", "?")]
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for so in sorted(lib_dir.glob("*")) if lib_dir.is_dir() else ():
        st = so.stat()
        parts.append(f"{so.name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ggufllm" / "kernels"


def _key(types: tuple[str, ...], moe: bool, fault: str) -> str:
    raw = "\0".join([build_identity(), " ".join(cpu_flags()), ",".join(types), str(moe), fault])
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _recall(key: str) -> dict[str, object] | None:
    try:
        data = json.loads((_cache_dir() / f"{key}.json").read_text())
        return data if isinstance(data, dict) and data.get("status") in ("passed", "failed") \
            else None
    except (OSError, ValueError):
        return None


def _remember(key: str, record: dict[str, object]) -> None:
    try:
        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, folder / f"{key}.json")
    except OSError as exc:  # a read-only home only costs a test per load
        logger.debug("cannot record the kernel self-test verdict: %s", exc)


def _timeout() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, TIMEOUT_S))
    except ValueError:
        return TIMEOUT_S


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def run_self_test(summary: GGUFSummary, n_threads: int) -> dict[str, object]:
    """Runs the child once (no cache): ``{"status", "reason", "buffers", "seconds"}``."""
    from .kernel_model import write_kernel_model

    fault = os.environ.get(FAULT_ENV, "")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ggufllm-kernels-") as tmp:
        model = write_kernel_model(summary, Path(tmp) / "kernels.gguf", poison=fault == "nan")
        # GGML_NO_BACKTRACE: an abort would otherwise attach gdb for a backtrace (seconds)
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        try:  # a PyInstaller bundle is its own sys.executable and runs _CHILD (packaging/entry.py)
            done = subprocess.run([sys.executable, str(_CHILD), str(model), str(n_threads)],
                                  capture_output=True, text=True, errors="replace", env=env,
                                  timeout=_timeout(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"hung (no answer in {_timeout():.0f} s)",
                    "buffers": [], "seconds": round(time.perf_counter() - started, 3)}
    seconds = round(time.perf_counter() - started, 3)
    last = (done.stdout.strip().splitlines() or [""])[-1]
    verdict, _, rest = last.partition("\t")
    if done.returncode < 0:
        return {"status": "failed", "buffers": [], "seconds": seconds,
                "reason": f"the test decode died ({_signal_name(done.returncode)})"}
    if verdict in ("ok", "nan") and done.returncode == 0:
        facts = json.loads(rest)
        return {"status": "passed" if verdict == "ok" else "failed", "seconds": seconds,
                "buffers": facts.get("buffers", []),
                "reason": "" if verdict == "ok" else "the test decode gave non-finite logits"}
    why = rest if verdict == "refused" else (done.stderr.strip().splitlines() or ["?"])[-1]
    return {"status": "failed", "buffers": [], "seconds": seconds,
            "reason": f"the test could not run (exit {done.returncode}: {why[:200]})"}


def decide_extra_buffers(mode: ExtraBuffersMode, summary: GGUFSummary,
                         n_threads: int) -> KernelVerdict:
    """Whether to load ``summary``'s model with llama.cpp's extra buffer types.

    Args:
        mode: the ``CPU_EXTRA_BUFFERS`` setting.
        summary: the model's header (its weight types choose the kernels tested).
        n_threads: the threads the model will decode with (the child uses as many).

    Raises:
        KernelSelfTestError: ``mode="on"`` and the self-test failed.
    """
    from .kernel_model import is_moe, weight_types

    if mode == "off":
        return KernelVerdict(mode, False, "not tested", "CPU_EXTRA_BUFFERS=off")
    if mode == "force":
        return KernelVerdict(mode, True, "not tested", "CPU_EXTRA_BUFFERS=force")
    types = weight_types(summary)
    if not types:  # F32 weights only: no extra buffer type applies
        return KernelVerdict(mode, True, "not tested", "no quantized weights")
    fault = os.environ.get(FAULT_ENV, "")
    key = _key(types, is_moe(summary), fault)
    record, cached = _recall(key), True
    if record is None:
        record, cached = run_self_test(summary, n_threads), False
        _remember(key, record)
        logger.info("CPU kernel self-test (%s): %s in %.2f s", ", ".join(types),
                    record["status"], record["seconds"])
    passed = record["status"] == "passed"
    verdict = KernelVerdict(mode, passed, "passed" if passed else "failed",
                            str(record.get("reason", "")), types,
                            tuple(record.get("buffers", [])),  # type: ignore[arg-type]
                            0.0 if cached else float(record["seconds"]), cached)  # type: ignore[arg-type]
    if not passed and mode == "on":
        raise KernelSelfTestError(verdict.reason, types)
    if not passed:
        logger.warning("llama.cpp's repacked CPU kernels failed a self-test on this CPU (%s): "
                       "loading without them, prompts run slower; %s", verdict.reason, _HOW)
    return verdict


def extra_buffers_for(path: str | os.PathLike[str], mode: ExtraBuffersMode = "auto",
                      n_threads: int | None = None) -> bool:
    """``use_extra_bufts`` for a bare llama.cpp load of ``path`` (benchmarks, references),
    so that it runs the kernels an engine over the same file runs.

    Raises:
        KernelSelfTestError: ``mode="on"`` and the self-test failed.
    """
    from ..gguf_file import read_gguf_header

    if n_threads is None:
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ()
        n_threads = len(cores) or os.cpu_count() or 1
    return decide_extra_buffers(mode, read_gguf_header(path, probe=False),
                                n_threads).use_extra_buffers
