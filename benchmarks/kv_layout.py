"""Does where a sequence's KV cells lie change its logits? Two cases the engine meets.

Drives llama.cpp's C API directly (no ggufllm engine), on random ordinary tokens.

1. **A saved sequence restored past its sliding window.** ``llama_state_seq_get_data``
   leaves out the cells the window masks, so the restored window cells sit at other cell
   indices than before. Compares the logits of the next token (and a few greedy steps)
   with and without a save -> clear -> restore, flash attention on and off. This is why
   ``ggufllm.engine.kvcache.restore_is_exact`` refuses such prefixes with flash attention.
2. **A window-sized cache (``SWA_FULL=false``, ``N_BATCH=64``).** The windowed layers keep
   a ring of ``pad256(n_swa + 64)`` cells, and where a token's cells land depends on what the
   ring held before. Compares a prompt evaluated from an empty cache with the same prompt
   reusing a prefix cut back from a longer evaluation that wrapped the ring (what the
   engine's prefix reuse does after an earlier question), both in 64-token pages from
   multiples of 64: the same batches, the last page's window cells elsewhere in the ring.

Both changes are rounding (the attention adds the same values in another grouping); how
large they are, and whether the greedy token moves, depends on the CPU's kernels. The
suite tolerates them only at near ties (tests/near_tie.py).

    python benchmarks/kv_layout.py [--model PATH] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import llama_cpp.llama_cpp as lib
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from batch_invariance import Bare  # noqa: E402

from ggufllm.engine.kvcache import seq_state_get, seq_state_set  # noqa: E402
from ggufllm.gguf_file import read_gguf_header  # noqa: E402
from ggufllm.kvlayout import KVLayout  # noqa: E402
from ggufllm.resolve import default_model_path  # noqa: E402

PAGE = 64


def random_tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 199998, n).tolist()


def feed(bare: Bare, tokens: list[int], start: int, page: int = 512) -> np.ndarray:
    """Evaluates ``tokens`` at positions ``start...`` of sequence 0 in batches cut at
    multiples of ``page``; the last token's logits."""
    end = start + len(tokens)
    pos = start
    while pos < end:
        stop = min(end, (pos // page + 1) * page)
        bare.decode([(tokens[p - start], p, 0, p == end - 1) for p in range(pos, stop)])
        last = stop - pos - 1
        pos = stop
    return bare.logits(last)


def greedy(bare: Bare, logits: np.ndarray, pos: int, steps: int) -> list[np.ndarray]:
    out = [logits]
    for _ in range(steps):
        out.append(feed(bare, [int(np.argmax(out[-1]))], pos))
        pos += 1
    return out


def compare(label: str, cold: list[np.ndarray], warm: list[np.ndarray]) -> None:
    same = sum(np.array_equal(a, b) for a, b in zip(cold, warm, strict=True))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(cold, warm, strict=True))
    tokens = sum(int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(cold, warm, strict=True))
    r = float(np.corrcoef(cold[0], warm[0])[0, 1])
    print(f"{label:44s}: bit-identical {same}/{len(cold)}, max |diff| {diff:.3g}, "
          f"greedy agrees {tokens}/{len(cold)}, corr(first logits) {r:.6f}")


def restore_past_the_window(path: str, n_swa: int, threads: int) -> None:
    # past the window (the oldest cells are masked and not saved), and at least 260 tokens:
    # from 512 cells on, the one-row flash-attention kernel splits the cells by thread
    n = max(n_swa + 88, 260)
    prompt = random_tokens(n, 0)
    for flash_attn in (True, False):
        bare = Bare(path, 1, 2048, flash_attn=flash_attn, n_threads=threads)
        try:
            lib.llama_memory_clear(bare.mem, True)
            feed(bare, prompt[:-1], 0)
            cold = greedy(bare, feed(bare, prompt[-1:], n - 1), n, 4)
            lib.llama_memory_clear(bare.mem, True)
            feed(bare, prompt[:-1], 0)
            state = seq_state_get(bare.ctx, 0)
            lib.llama_memory_clear(bare.mem, True)
            assert seq_state_set(bare.ctx, 0, state, n - 1)
            warm = greedy(bare, feed(bare, prompt[-1:], n - 1), n, 4)
        finally:
            bare.close()
        compare(f"restore of {n - 1} tokens, flash attention {'on' if flash_attn else 'off'}",
                cold, warm)


def window_sized_cache(path: str, n_swa: int, threads: int) -> None:
    ring = -(-(n_swa + PAGE) // 256) * 256  # the window cache's cells (n_ubatch 64)
    # the prefix ends one page before the ring's end, as in the engine's test (448 of 510
    # tokens in 256 cells): a longer question after it wraps the ring, and once cut back the
    # ring's first free cell is cell 0, where the cold run had the prompt's last page at the end
    cut = 2 * ring - PAGE
    n = cut + PAGE - 2
    prompt, other = random_tokens(n, 1), random_tokens(PAGE + 16, 2)
    for flash_attn in (True, False):
        bare = Bare(path, 1, 4096, swa_full=False, flash_attn=flash_attn, n_threads=threads,
                    n_batch=PAGE)
        try:
            lib.llama_memory_clear(bare.mem, True)
            cold = greedy(bare, feed(bare, prompt, 0, PAGE), n, 4)
            lib.llama_memory_clear(bare.mem, True)
            feed(bare, prompt[:cut] + other, 0, PAGE)  # another question after the same prefix
            assert lib.llama_memory_seq_rm(bare.mem, 0, cut, -1)
            warm = greedy(bare, feed(bare, prompt[cut:], cut, PAGE), n, 4)
        finally:
            bare.close()
        compare(f"window cache of {ring} cells, prefix {cut} reused, "
                f"FA {'on' if flash_attn else 'off'}", cold, warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2,
                    help="threads per decode (the flash-attention kernel splits by thread)")
    args = ap.parse_args()
    path = args.model or str(default_model_path())
    n_swa = KVLayout.from_gguf(read_gguf_header(path)).n_swa
    if n_swa == 0:
        raise SystemExit(f"{path} has no sliding window: nothing to measure")
    print(f"model {path}, window {n_swa}, {args.threads} threads")
    restore_past_the_window(path, n_swa, args.threads)
    window_sized_cache(path, n_swa, args.threads)


if __name__ == "__main__":
    main()
