"""What one prompt chunk costs after a long cached prefix, by its number of rows (bare llama.cpp).

A follow-up question over a cached document evaluates only what is not cached: the
document's last partial page and the question, often fewer than 64 tokens. llama.cpp's
CPU flash attention takes its tiled path only from 64 query rows (``GGML_FA_TILE_Q`` in
ggml-cpu); below that each row scans the whole KV cache on its own. This script fills the
KV cache of a bare llama.cpp context with ``--kv`` cells (64-token pages), then times one
``llama_decode`` of each chunk size after it (best of ``--repeat``, the chunk's cells
removed between tries), flash attention on, kernels as ggufllm's self-test chose them.

    python benchmarks/chunk_rows.py [--model PATH | --gpt-oss-fixture] [--kv 1024,3008]
"""

from __future__ import annotations

import argparse
import time

import llama_cpp.llama_cpp as lib

from ggufllm.native.kernels import extra_buffers_for
from ggufllm.native.runtime import default_threads, ensure_backend
from ggufllm.resolve import default_model_path

ROWS = (1, 7, 16, 37, 53, 63, 64, 101, 128)


def timings(path: str, kv_sizes: list[int], rows: tuple[int, ...], repeat: int
            ) -> dict[int, dict[int, float]]:
    """{kv cells: {chunk rows: best ms}}."""
    ensure_backend()
    mparams = lib.llama_model_default_params()
    mparams.use_extra_bufts = extra_buffers_for(path)
    model = lib.llama_model_load_from_file(path.encode(), mparams)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = max(kv_sizes) + max(rows) + 64
    cparams.n_batch = cparams.n_ubatch = 512
    cparams.n_threads = cparams.n_threads_batch = default_threads()
    cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
    cparams.kv_unified, cparams.swa_full = True, True
    ctx = lib.llama_init_from_model(model, cparams)
    memory = lib.llama_get_memory(ctx)
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    batch = lib.llama_batch_init(512, 0, 1)

    def decode(start: int, n: int) -> float:
        batch.n_tokens = n
        for i in range(n):
            batch.token[i] = (1000 + 7 * (start + i)) % n_vocab
            batch.pos[i], batch.n_seq_id[i], batch.logits[i] = start + i, 1, i == n - 1
            batch.seq_id[i][0] = 0
        began = time.perf_counter()
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return (time.perf_counter() - began) * 1000

    out: dict[int, dict[int, float]] = {}
    filled = 0
    try:
        for kv in sorted(kv_sizes):
            while filled < kv:
                n = min(64, kv - filled)
                decode(filled, n)
                filled += n
            out[kv] = {}
            for n in rows:
                best = float("inf")
                for _ in range(repeat):
                    lib.llama_memory_seq_rm(memory, 0, kv, -1)
                    best = min(best, decode(kv, n))
                out[kv][n] = best
            lib.llama_memory_seq_rm(memory, 0, kv, -1)
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded model)")
    ap.add_argument("--gpt-oss-fixture", action="store_true",
                    help="the tiny gpt-oss checkpoint the tests build, as Q8_0")
    ap.add_argument("--kv", default="1024,3008", help="cached cells before the chunk")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.gpt_oss_fixture:
        from kv_cache import gpt_oss_fixture

        path = gpt_oss_fixture()
    else:
        path = args.model or str(default_model_path())
    kv_sizes = [int(k) for k in args.kv.split(",")]
    table = timings(path, kv_sizes, ROWS, args.repeat)
    print(f"model {path}, threads {default_threads()}, flash attention on, best of "
          f"{args.repeat}")
    print("cached cells " + "".join(f"{n:>9} rows" for n in ROWS))
    for kv, row in table.items():
        print(f"{kv:>12} " + "".join(f"{row[n]:>12.1f}ms" for n in ROWS))
    for kv, row in table.items():
        print(f"after {kv} cells: 37 rows {row[37]:.1f} ms, 64 rows {row[64]:.1f} ms "
              f"(64 / 37 = {row[64] / row[37]:.2f}x)")


if __name__ == "__main__":
    main()
