"""Full-size conversion benchmark: a synthetic gpt-oss-20b checkpoint (random values in the
real shapes and dtypes, ~13 GB) converted to q8_0 and q4_k_m.

Reports, for each type: wall time, MB/s of source read, the disk's sequential read speed
measured in the same run, and peak RSS of the converting process.

    python benchmarks/convert_full_size.py --workdir /path/with/40GB/free [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.gpt_oss_fixture import TINY_CONFIG, write_tokenizer  # noqa: E402

REAL = dict(TINY_CONFIG, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
            num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
            num_experts_per_tok=4, experts_per_token=4, sliding_window=128,
            layer_types=["sliding_attention", "full_attention"] * 12)


def shapes(cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    from convert.gpt_oss import _expected

    return _expected(cfg)


def write_shard(path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                rng: np.random.Generator) -> None:
    header, offset = {}, 0
    sizes = {"BF16": 2, "U8": 1}
    for name, dtype, shape in entries:
        n = int(np.prod(shape)) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, dtype, shape in entries:
            n = int(np.prod(shape))
            if dtype == "U8":
                hi = 124 if name.endswith("_scales") else 256
                lo = 119 if name.endswith("_scales") else 0
                f.write(rng.integers(lo, hi, n, dtype=np.uint8).tobytes())
            else:  # bf16 bit patterns of small values of either sign
                bits = rng.integers(0x3C00, 0x3D80, n, dtype=np.uint16)
                bits |= (rng.integers(0, 2, n, dtype=np.uint16) << 15)
                f.write(bits.tobytes())


def make_checkpoint(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(REAL, indent=2))
    write_tokenizer(folder)
    rng = np.random.default_rng(0)
    items = [(n, d, s) for n, (d, s) in shapes(REAL).items()]
    shards = [items[i::3] for i in range(3)]
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"model-0000{i}-of-00002.safetensors"
        write_shard(folder / name, part, rng)
        weight_map |= {n: name for n, _, _ in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def read_speed(folder: Path) -> float:
    """Sequential read MB/s of the shards (page cache dropped first when allowed)."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("note: could not drop the page cache; read speed may include cached data")
    total, start = 0, time.perf_counter()
    for shard in sorted(folder.glob("*.safetensors")):
        with shard.open("rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    return total / 1e6 / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    args = ap.parse_args()
    src = args.workdir / "gpt-oss-20b-synthetic"
    if not (src / "model.safetensors.index.json").exists():
        t = time.perf_counter()
        make_checkpoint(src)
        print(f"synthetic checkpoint: {time.perf_counter() - t:.0f} s")
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"source: {size / 1e9:.2f} GB in {len(list(src.glob('*.safetensors')))} shards")
    for out_type in ("q8_0", "q4_k_m"):
        disk = read_speed(src)
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError:
            pass
        out = args.workdir / f"gpt-oss-20b-{out_type}.gguf"
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "convert", str(src), "-o", str(out),
                               "--type", out_type, "--force"], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            print(proc.stderr[-2000:])
            raise SystemExit(1)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(f"{out_type}: {wall:.0f} s wall, {size / 1e6 / wall:.0f} MB/s of source "
              f"(disk sequential read {disk:.0f} MB/s), output {out.stat().st_size / 1e9:.2f} GB, "
              f"peak RSS {rss / 1e9:.2f} GB (largest of the runs so far)")
        out.unlink()
    if not args.keep:
        shutil.rmtree(src)


if __name__ == "__main__":
    main()
