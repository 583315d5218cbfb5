"""ggufllm serve against llama-server (the peer): same model, slots, threads and client.

    python benchmarks/llama_server_peer.py [--rounds 3] [--requests 16] [--max-tokens 64]
                                           [--concurrency 1,4,8] [--threads 2]

llama-server is the one ``bash benchmarks/build_llama_server.sh`` builds from the
llama.cpp that llama-cpp-python 0.3.36 vendors (``$GGUFLLM_SCRATCH/llama-server-build/
bin/llama-server``, ``$GGUFLLM_SCRATCH`` defaulting to ``~/.cache/ggufllm-scratch``), or
the binary ``$LLAMA_SERVER`` names. Both servers run at once, idle in turn: each
round measures every concurrency level against one server, then the other (the order
alternates between rounds), with ``ggufllm bench``'s client (greedy streamed
``/v1/completions``, ``--requests`` requests of ``--max-tokens`` tokens). Both get
``--threads`` threads, ``--parallel`` = the highest level, and 1024 tokens per slot.
llama-server runs the CPU kernels ggufllm runs: with ``--no-repack`` where ggufllm's CPU
kernel self-test keeps llama.cpp's extra buffer types off (``CPU_EXTRA_BUFFERS``; on a
virtualized AMX Xeon llama-server crashes at its first decode without it).

Per level it prints each server's median aggregate tok/s over the rounds, the median of
the per-round ratios (ggufllm / llama-server; on a shared machine single rounds drift),
each server's speed-up against its own rate at the lowest level, and p50 / p95 time to
first token over all rounds' requests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ggufllm.config import load_settings
from ggufllm.native.kernels import extra_buffers_for
from ggufllm.resolve import default_model_path
from ggufllm.server.bench import (
    BenchOptions,
    LevelResult,
    free_port,
    parse_levels,
    percentile,
    run_level,
    wait_ready,
)

BUILD_SCRIPT = Path(__file__).with_name("build_llama_server.sh")
STARTUP_S = 300.0


def _peer_binary() -> Path:
    """Where ``build_llama_server.sh`` puts llama-server, unless ``$LLAMA_SERVER`` names one."""
    if "LLAMA_SERVER" in os.environ:
        return Path(os.environ["LLAMA_SERVER"])
    scratch = Path(os.environ.get("GGUFLLM_SCRATCH", Path.home() / ".cache/ggufllm-scratch"))
    return scratch / "llama-server-build/bin/llama-server"


def _wait_up(name: str, url: str, proc: subprocess.Popen[bytes]) -> None:
    """Waits until ``url`` answers ``/health``; exits with a message if the server died."""
    deadline = time.monotonic() + STARTUP_S
    while True:
        if proc.poll() is not None:
            sys.exit(f"{name} exited with status {proc.returncode} before it was ready (its "
                     "output is discarded here: run it by hand to see why)")
        try:
            wait_ready(url, timeout_s=1.0)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                sys.exit(f"{name} was not ready within {STARTUP_S:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    levels = parse_levels(args.concurrency)
    slots = max(levels)
    model = str(default_model_path())
    options = BenchOptions(levels=levels, n_requests=args.requests, max_tokens=args.max_tokens)
    peer = _peer_binary()
    if not peer.is_file():
        sys.exit(f"llama-server not found at {peer}: `bash {BUILD_SCRIPT}` builds it under "
                 "$GGUFLLM_SCRATCH (about 15 minutes on 2 cores), or set LLAMA_SERVER to a "
                 "llama-server binary")
    # the kernels ggufllm serve will run (its self-test verdict is cached per build and CPU)
    extra = extra_buffers_for(model, load_settings().cpu_extra_buffers, args.threads)
    servers: dict[str, str] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        procs.append(subprocess.Popen(
            [str(peer), "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t",
             str(args.threads), "-np", str(slots), "-c", str(1024 * slots), "--log-disable",
             *(() if extra else ("--no-repack",))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        servers["llama-server"] = f"http://127.0.0.1:{port}"
        port = free_port()
        env = dict(os.environ, N_THREADS=str(args.threads), MAX_LENGTH="1024")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ggufllm.cli", "serve", "--model", model, "--port", str(port),
             "--parallel", str(slots)], env=env, stderr=subprocess.DEVNULL))
        servers["ggufllm"] = f"http://127.0.0.1:{port}"
        for (name, url), proc in zip(servers.items(), procs, strict=True):
            _wait_up(name, url, proc)
            run_level(url, 1, BenchOptions(n_requests=1, max_tokens=8), None)  # warm-up
        print(f"model {model}, {args.threads} threads, {slots} slots, {args.requests} requests x "
              f"{args.max_tokens} tokens, {args.rounds} rounds, llama.cpp's extra buffer types "
              f"{'on' if extra else 'off'} for both")
        runs: dict[tuple[str, int], list[LevelResult]] = {}
        names = list(servers)
        for k in range(args.rounds):
            order = names if k % 2 == 0 else names[::-1]
            for c in levels:
                row = []
                for name in order:
                    level = run_level(servers[name], c, options, None)
                    runs.setdefault((name, c), []).append(level)
                    row.append(f"{name} {level.tokens_per_s:6.1f}")
                print(f"round {k + 1}  {c} clients: " + "   ".join(row) + " tok/s", flush=True)
        print(f"\n{'clients':>7} {'llama-server':>12} {'ggufllm':>8} {'ratio':>6} "
              f"{'x 1 client peer/ours':>21} {'TTFT p50 peer/ours':>19} {'TTFT p95 peer/ours':>19}")
        rate = {(name, c): statistics.median(r.tokens_per_s for r in runs[(name, c)])
                for name in names for c in levels}
        base = min(levels)
        for c in levels:
            peer_runs, ours_runs = runs[("llama-server", c)], runs[("ggufllm", c)]
            ratio = statistics.median(o.tokens_per_s / p.tokens_per_s
                                      for o, p in zip(ours_runs, peer_runs, strict=True))
            ttft = {name: [r.ttft_s for level in runs[(name, c)] for r in level.results]
                    for name in names}
            scale = [rate[(name, c)] / rate[(name, base)] for name in names]
            print(f"{c:>7} {rate[('llama-server', c)]:>12.1f} {rate[('ggufllm', c)]:>8.1f} "
                  f"{ratio:>6.2f} {scale[0]:>15.2f}/{scale[1]:.2f} "
                  f"{percentile(ttft['llama-server'], 50):>9.3f}/{percentile(ttft['ggufllm'], 50):.3f}s"
                  f"{percentile(ttft['llama-server'], 95):>13.3f}/{percentile(ttft['ggufllm'], 95):.3f}s")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
