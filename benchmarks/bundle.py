"""The PyInstaller bundle's size and start-up time, beside the venv's ``ggufllm``.

Usage: python benchmarks/bundle.py [--bundle dist/ggufllm/ggufllm] [--rounds 3]
(without --bundle it builds one into a temporary folder first, as tests/test_bundle.py does).

Each command answers the same question greedily (``ask ... --temperature 0``) in an empty
folder under one fresh HOME, the bundle with Python's variables and the venv's bin removed
(tests/test_bundle.py's environment). One unmeasured run of each first leaves the embedded
model assembled and each build's kernel self-test verdict cached; then the time from start
to the end of the answer (the process exits after it) is the median of ``--rounds`` runs,
beside the CPU time the process used (less sensitive to a busy machine than the wall clock).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_bundle import QUESTION, bare_env, build_bundle  # noqa: E402


def _seconds(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall-clock and CPU (user + sys) seconds of one run of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or (cmd[1] == "ask" and "Paris" not in done.stdout):
        raise SystemExit(f"{cmd[0]} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return took, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=None, help="A built dist/ggufllm/ggufllm.")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ggufllm-bundle-") as tmp:
        root = Path(tmp)
        exe = args.bundle.resolve() if args.bundle else build_bundle(root / "out")
        home, work = root / "home", root / "work"
        home.mkdir()
        work.mkdir()
        env = bare_env(home)
        programs = {"bundle": str(exe), "venv": str(Path(sys.prefix) / "bin" / "ggufllm")}
        # `ask`: to the answer; `--help`: the start-up alone (imports, no model)
        argvs = {"ask": ["ask", QUESTION, "--temperature", "0"], "--help": ["--help"]}
        commands = {f"{name} `ggufllm {label}`": [program, *argv]
                    for label, argv in argvs.items() for name, program in programs.items()}
        size = subprocess.run(["du", "-sh", str(exe.parent)], capture_output=True, text=True,
                              check=True).stdout.split()[0]
        print(f"bundle {exe.parent}: {size} (du -sh)")
        print(f"| command | wall clock, median of {args.rounds} (s) | runs (s) "
              f"| CPU time (user + sys), median (s) |")
        print("| --- | --- | --- | --- |")
        for name, cmd in commands.items():
            _seconds(cmd, work, env)  # warm: the model assembled, the kernel verdict cached
            runs = [_seconds(cmd, work, env) for _ in range(args.rounds)]
            wall = [w for w, _ in runs]
            print(f"| {name} | {statistics.median(wall):.2f} | "
                  f"{', '.join(f'{w:.2f}' for w in wall)} | "
                  f"{statistics.median(c for _, c in runs):.2f} |")


if __name__ == "__main__":
    main()
