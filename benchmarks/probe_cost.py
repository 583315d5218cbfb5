"""What the pre-load checks cost: the static check and the one-time probe load.

Usage: python benchmarks/probe_cost.py [--rounds 5] [FILE.gguf ...]
(default: the embedded Gemma 3 270M and a tiny gpt-oss GGUF with the real
201,088-token vocabulary, converted into a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ggufllm.gguf_file import read_gguf_header  # noqa: E402
from ggufllm.gguf_probe import probe_model_file  # noqa: E402
from ggufllm.resolve import default_model_path  # noqa: E402


def _ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _gpt_oss_file(tmp: Path) -> Path:
    from convert import convert
    from tests.gpt_oss_fixture import write_checkpoint

    return convert(write_checkpoint(tmp / "ckpt"), tmp / "tiny-q8_0.gguf", "q8_0").path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = args.files or [default_model_path(), _gpt_oss_file(Path(tmp))]
        print("| file | static check (ms) | probe, first load (ms) | probe, cached (ms) |")
        print("| --- | --- | --- | --- |")
        for f in files:
            static = _ms(lambda f=f: read_gguf_header(f, probe=False), args.rounds)
            cold = []
            for i in range(args.rounds):
                os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / f"cache{i}")  # a fresh cache
                cold.append(_ms(lambda f=f: probe_model_file(f), 1))
            cached = _ms(lambda f=f: probe_model_file(f), args.rounds)
            print(f"| {f.name} | {static:.0f} | {statistics.median(cold):.0f} | {cached:.2f} |")


if __name__ == "__main__":
    main()
