"""The steps of benchmarks/gpu_check.sh: build, write a synthetic gpt-oss GGUF, measure.

    python benchmarks/gpu_check.py write --size full|small --out MODEL.gguf
    python benchmarks/gpu_check.py build --preset cuda-sm90 --source SDIST --log BUILD.log
    python benchmarks/gpu_check.py bench --model MODEL.gguf [--gpu] [--json OUT.json]

``write`` and ``build`` run before llama-cpp-python exists on a fresh GPU machine, so they
import ggufllm's submodules without ``ggufllm/__init__`` (which loads llama.cpp).
``write`` goes through the converter's own writer (metadata, tensor infos, tensor data):
the real gpt-oss-20b tensor plan (names, shapes, Q8_0 matrices and MXFP4 experts) with
random values, and a byte-level vocabulary of the real size with the harmony specials.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _bare_packages() -> None:
    """Makes ``ggufllm`` and ``ggufllm.gpu`` importable without running their ``__init__``."""
    for name, folder in (("ggufllm", ROOT / "ggufllm"), ("ggufllm.gpu", ROOT / "ggufllm" / "gpu")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(folder)]
            sys.modules[name] = module


# -- the synthetic model ---------------------------------------------------------

def model_config(size: str) -> dict[str, Any]:
    from tests.gpt_oss_fixture import TINY_CONFIG

    if size == "full":  # openai/gpt-oss-20b
        return dict(TINY_CONFIG, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                    num_local_experts=32, num_experts_per_tok=4, experts_per_token=4,
                    sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 12)
    return dict(TINY_CONFIG, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_local_experts=8,
                num_experts_per_tok=2, experts_per_token=2, sliding_window=128,
                layer_types=["sliding_attention", "full_attention"] * 2)


@dataclasses.dataclass
class _Tensor:
    """A checkpoint tensor with a shape and no values (``produce`` is replaced before use)."""

    shape: tuple[int, ...]
    dtype: str

    def float32(self) -> np.ndarray:
        raise AssertionError("a synthetic tensor has no source values")

    array = float32


class _SyntheticCheckpoint:
    """What the converter reads from a checkpoint folder, with no weights behind it."""

    def __init__(self, cfg: dict[str, Any], folder: Path) -> None:
        from convert.gpt_oss import _expected
        from tests.gpt_oss_fixture import NAMED_SPECIALS, VOCAB_SIZE, special_tokens

        self.config, self.folder = dict(cfg, _name_or_path="gpt-oss-synthetic"), folder
        self.tensors = {n: _Tensor(s, d) for n, (d, s) in _expected(cfg).items()}
        # byte-level BPE: the 256 byte symbols, merges of letter pairs, harmony specials
        byte_symbols = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + \
            [chr(c) for c in range(174, 256)] + [chr(256 + i) for i in range(68)]
        pairs = [a + b for a in "etaoinshrdlu" for b in "etaoinshrdlu"]
        vocab = {t: i for i, t in enumerate(byte_symbols + pairs)}
        specials = special_tokens()
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer_json = folder / "tokenizer.json"
        self.tokenizer_json.write_text(json.dumps({
            "model": {"type": "BPE", "vocab": vocab, "merges": [f"{p[0]} {p[1]}" for p in pairs]},
            "added_tokens": [{"id": 199998 + i, "content": t, "special": True}
                             for i, t in enumerate(specials)]}))
        assert len(specials) + 199998 == VOCAB_SIZE
        self.tokenizer_config = {"bos_token": NAMED_SPECIALS[199998],
                                 "eos_token": NAMED_SPECIALS[200002],
                                 "pad_token": NAMED_SPECIALS[199999]}
        self.chat_template = None

    def manifest_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()


_POOL_BYTES = 8 << 20


def _pool(qtype: Any, rng: np.random.Generator) -> np.ndarray:
    """Valid encoded blocks of random values (scales small enough for finite activations)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if qtype is Q.F32:
        return (rng.standard_normal(_POOL_BYTES // 4, dtype=np.float32) * 0.02)
    block, size = GGML_QUANT_SIZES[qtype]
    n = _POOL_BYTES // size
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    if qtype is Q.MXFP4:  # E8M0 scale byte first: 2^-8 .. 2^-4
        raw[:, 0] = rng.integers(119, 124, n, dtype=np.uint8)
    elif qtype is Q.Q8_0:  # F16 scale first: 1e-3 .. 2e-3
        raw[:, :2] = (rng.uniform(1e-3, 2e-3, n).astype(np.float16).view(np.uint8)
                      .reshape(n, 2))
    else:
        raise ValueError(f"no synthetic encoding for {qtype.name}")
    return raw.reshape(-1)


def write_synthetic(out: Path, size: str) -> Path:
    """Writes the synthetic GGUF through the converter's writer; returns its path."""
    _bare_packages()
    import gguf

    from convert import converter, gpt_oss
    from convert.quant import ExpertType, OutType, n_bytes

    ckpt = _SyntheticCheckpoint(model_config(size), out.parent / (out.stem + "-tokenizer"))
    jobs = gpt_oss.plan(ckpt, OutType.Q8_0, ExpertType.MXFP4)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    pools: dict[Any, np.ndarray] = {}

    def produce(job: Any) -> Any:
        def make() -> np.ndarray:
            pool = pools.setdefault(job.qtype, _pool(job.qtype, rng))
            count = n_bytes(job.qtype, job.shape) // pool.itemsize
            # vary where the tiling starts, on a block boundary (scales stay in place)
            unit = 1 if pool.dtype == np.float32 else gguf.GGML_QUANT_SIZES[job.qtype][1]
            start = int(rng.integers(0, pool.size // unit)) * unit
            return np.resize(np.roll(pool, -start), count)
        return make

    jobs = [dataclasses.replace(j, produce=produce(j)) for j in jobs]
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gpt_oss.ARCH])
    converter._write_metadata(w, ckpt, gpt_oss, OutType.Q8_0, ExpertType.MXFP4)  # type: ignore[arg-type]
    converter._write_tensor_infos(w, jobs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = converter._write_tensor_data(w, jobs, None)
    w.close()
    print(f"wrote {out} ({total / 1e9:.2f} GB, {len(jobs)} tensors)", flush=True)
    return out


def synthetic_summary(size: str) -> Any:
    """The header of the GGUF :func:`write_synthetic` would write, without writing it."""
    import tempfile

    _bare_packages()
    from convert import gpt_oss
    from convert.quant import ExpertType, OutType, n_bytes
    from ggufllm.gguf_file import GGUFSummary, TensorInfo
    from tests.gpt_oss_fixture import VOCAB_SIZE

    cfg = model_config(size)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _SyntheticCheckpoint(cfg, Path(tmp))
    jobs = gpt_oss.plan(ckpt, OutType.Q8_0, ExpertType.MXFP4)  # type: ignore[arg-type]
    tensors = [TensorInfo(j.name, tuple(reversed(j.shape)), j.qtype, 0, n_bytes(j.qtype, j.shape))
               for j in jobs]
    a = "gpt-oss"
    meta = {"general.architecture": a, f"{a}.block_count": cfg["num_hidden_layers"],
            f"{a}.embedding_length": cfg["hidden_size"],
            f"{a}.attention.head_count": cfg["num_attention_heads"],
            f"{a}.attention.head_count_kv": cfg["num_key_value_heads"],
            f"{a}.attention.key_length": cfg["head_dim"],
            f"{a}.attention.value_length": cfg["head_dim"],
            f"{a}.attention.sliding_window": cfg["sliding_window"]}
    return GGUFSummary(Path(f"gpt-oss-{size}-synthetic.gguf"), 3, 0, metadata=meta,
                       array_lengths={"tokenizer.ggml.tokens": VOCAB_SIZE}, tensors=tensors)


# -- the build -------------------------------------------------------------------

def build(preset_name: str, source: str | None, log: Path) -> int:
    _bare_packages()
    from ggufllm.gpu.install import preflight, run_build
    from ggufllm.gpu.presets import load_presets

    preset = load_presets()[preset_name]
    # The check never loads llava/mtmd (llama_cpp imports it lazily): skip building it.
    preset = dataclasses.replace(preset, cache_variables={**preset.cache_variables,
                                                          "LLAVA_BUILD": "OFF"})
    errors, warnings = preflight(preset)
    for line in warnings + errors:
        print(line, flush=True)
    if errors:
        return 1
    start, last = time.monotonic(), [0.0]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 15 or done == total:
            last[0] = time.monotonic()
            print(f"  build [{done}/{total}] {last[0] - start:.0f} s", flush=True)

    result = run_build(preset, log, source=source, build_isolation=False, on_progress=progress)
    print(f"build: {'ok' if result.ok else 'FAILED'} in {time.monotonic() - start:.0f} s, "
          f"gpu offload compiled in: {result.gpu_offload}; log {log}", flush=True)
    for cause in result.causes:
        print(f"  - {cause}", flush=True)
    if not result.ok:
        print(log.read_text(errors="replace")[-3000:])
    return 0 if result.ok else 1


def main() -> int:
    if sys.argv[1:2] == ["bench"]:  # needs llama.cpp: imported only here
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from gpu_bench import main as bench_main

        return bench_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("bench", help="see benchmarks/gpu_bench.py")
    w = sub.add_parser("write")
    w.add_argument("--size", choices=["full", "small"], default="small")
    w.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("build")
    b.add_argument("--preset", default="cuda-sm90")
    b.add_argument("--source", default=None)
    b.add_argument("--log", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "write":
        t = time.monotonic()
        write_synthetic(args.out, args.size)
        print(f"write: {time.monotonic() - t:.0f} s", flush=True)
        return 0
    return build(args.preset, args.source, args.log)


if __name__ == "__main__":
    sys.exit(main())
