"""Is a sequence decoded in a batch with others bit-identical to the same sequence alone?

Drives llama.cpp's C API directly (no ggufllm engine): one context with a unified
KV cache of ``n_seq`` sequences. Run 1 decodes sequence 0 alone (prompt, then
greedy tokens one at a time). Run 2 clears the cache and decodes the same
sequence together with ``n_seq - 1`` other prompts, all prompts in one batch and
then one token per sequence per batch. Run 3 evaluates the others' prompts in
the same batches as sequence 0's decode steps (what a scheduler does when a
request arrives mid-stream). Run 4 evaluates each prompt in its own call and batches
only the decode steps (what ggufllm's scheduler does), for 2, 3, ... ``n_seq``
sequences. Prints, for each run, whether the logits of sequence 0 are bitwise equal
to run 1 at every step, the largest absolute difference, and whether the greedy
tokens agree. Then: a prompt cut into two batches
at every point, and a prompt placed after k cells of another sequence (does where its
cells lie change its logits?).

These are measurements of the kernels of the CPU they run on (its SIMD width, its
repacked weight layouts), not guarantees; the suite asserts only that the same batches
into the same cells give the same logits (tests/test_engine_invariance.py).

    python benchmarks/batch_invariance.py [--model PATH] [--tokens 48] [--seqs 4]
"""

from __future__ import annotations

import argparse
import ctypes

import llama_cpp.llama_cpp as lib
import numpy as np

from ggufllm.native.kernels import extra_buffers_for
from ggufllm.native.runtime import default_threads, ensure_backend
from ggufllm.resolve import default_model_path

PROMPTS = ["Question: What is the capital of France?\nAnswer:",
           "Question: Why is the sky blue?\nAnswer:",
           "Write a long story about a dragon who learns to fly.",
           "Question: Who wrote Hamlet?\nAnswer:",
           "The history of the Roman empire begins",
           "List the planets of the solar system:",
           "Question: What is water made of?\nAnswer:",
           "def fibonacci(n):"]


# the prompt cut in two at every point (38 tokens with Gemma 3's vocabulary)
SPLIT_PROMPT = ("Context: The Zorblat festival is held every spring in the town of Quenby, near "
                "the river. Question: Where is the Zorblat festival held?\nAnswer:")


class Bare:
    """A model, a unified-KV context and one llama_batch.

    ``swa_full``, ``flash_attn`` (None: llama.cpp decides), ``n_threads`` (None: the
    engine's default) and ``n_batch`` (at most 512; also the micro-batch) set the context
    like ggufllm's settings of the same names.
    """

    def __init__(self, path: str, n_seq: int, n_ctx: int, *, swa_full: bool = True,
                 flash_attn: bool | None = None, n_threads: int | None = None,
                 n_batch: int = 512) -> None:
        ensure_backend()
        mparams = lib.llama_model_default_params()
        # the kernels the engine runs: extra buffers only where ggufllm's self-test passed
        mparams.use_extra_bufts = extra_buffers_for(path)
        self.model = lib.llama_model_load_from_file(path.encode(), mparams)
        p = lib.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_batch, n_seq
        p.kv_unified, p.swa_full = True, swa_full
        p.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None
                             else int(flash_attn))
        p.n_threads = p.n_threads_batch = n_threads or default_threads()
        self.ctx = lib.llama_init_from_model(self.model, p)
        self.mem = lib.llama_get_memory(self.ctx)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.batch = lib.llama_batch_init(512, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (lib.llama_token * (len(data) + 8))()
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, False)
        return list(buf[:n])

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0], b.logits[i] = seq, logits
        b.n_tokens = len(items)
        rc = lib.llama_decode(self.ctx, b)
        assert rc == 0, rc

    def logits(self, i: int) -> np.ndarray:
        ptr = lib.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                     (self.n_vocab,)).copy()

    def close(self) -> None:
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.ctx)
        lib.llama_model_free(self.model)


def split_prompt(bare: Bare, tokens: list[int], split: int) -> np.ndarray:
    """Evaluates ``tokens`` as two batches cut at ``split``; the last token's logits."""
    lib.llama_memory_clear(bare.mem, True)
    items = prompt_items(tokens, 0)
    if split:
        bare.decode([(t, p, s, False) for t, p, s, _ in items[:split]])
    bare.decode(items[split:])
    return bare.logits(len(tokens) - split - 1)


def prompt_items(tokens: list[int], seq: int) -> list[tuple[int, int, int, bool]]:
    return [(t, p, seq, p == len(tokens) - 1) for p, t in enumerate(tokens)]


def run(bare: Bare, prompts: list[list[int]], n_tokens: int, mode: str) -> list[np.ndarray]:
    """Greedy-decodes every prompt together; returns sequence 0's logits at each step."""
    lib.llama_memory_clear(bare.mem, True)
    n = len(prompts)
    late = mode == "late" and n > 1
    first = [prompts[0]] if (mode == "alone" or late) else prompts
    idx = {}
    if mode == "apart":  # each prompt in its own llama_decode, as ggufllm's scheduler does
        saved = {}
        for s, toks in enumerate(first):
            bare.decode(prompt_items(toks, s))
            saved[s] = bare.logits(len(toks) - 1)
    else:
        items = [it for s, toks in enumerate(first) for it in prompt_items(toks, s)]
        bare.decode(items)
        # where each sequence's logits sit in the batch
        ends = 0
        for s, toks in enumerate(first):
            ends += len(toks)
            idx[s] = ends - 1
        saved = {s: bare.logits(i) for s, i in idx.items()}
    pos = {s: len(prompts[s]) for s in range(len(first))}
    out = []
    for step in range(n_tokens):
        current = saved if step == 0 else {s: bare.logits(i) for s, i in idx.items()}
        out.append(current[0])
        step_items = []
        for s in list(pos):
            tok = int(np.argmax(current[s]))
            step_items.append((tok, pos[s], s, True))
            pos[s] += 1
        if late and step == 2:  # the other prompts arrive mid-stream, in one batch with it
            for s in range(1, n):
                step_items += prompt_items(prompts[s], s)
                pos[s] = len(prompts[s])
        bare.decode(step_items)
        idx, k = {}, 0
        for it_i, (_, _, s, lg) in enumerate(step_items):
            if lg:
                idx[s] = it_i
                k += 1
    return out


def placed(bare: Bare, tokens: list[int], shift: int) -> np.ndarray:
    """Evaluates ``tokens`` in one batch after ``shift`` cells of sequence 1; the last
    token's logits (the same batch, its cells elsewhere in the pool)."""
    lib.llama_memory_clear(bare.mem, True)
    if shift:
        bare.decode([(tokens[0], k, 1, False) for k in range(shift)])
    bare.decode(prompt_items(tokens, 0))
    return bare.logits(len(tokens) - 1)


def report(label: str, alone: list[np.ndarray], logits: list[np.ndarray]) -> None:
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(alone, logits, strict=True)]
    identical = sum(np.array_equal(a, b) for a, b in zip(alone, logits, strict=True))
    same_tok = sum(int(np.argmax(a)) == int(np.argmax(b))
                   for a, b in zip(alone, logits, strict=True))
    print(f"{label:38s}: bit-identical steps {identical}/{len(alone)}, "
          f"max |diff| {max(diffs):.3g}, greedy token agrees {same_tok}/{len(alone)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--seqs", type=int, default=4)
    args = ap.parse_args()
    path = args.model or str(default_model_path())
    bare = Bare(path, max(args.seqs, 2), 4096)
    try:
        prompts = [bare.tokenize(p) for p in PROMPTS[: args.seqs]]
        alone = run(bare, prompts[:1], args.tokens, "alone")
        print(f"model {path}, {args.seqs} sequences, {args.tokens} steps")
        report("alone again", alone, run(bare, prompts[:1], args.tokens, "alone"))
        for n in range(2, args.seqs + 1):
            report(f"decode shared by {n}, prompts apart", alone,
                   run(bare, prompts[:n], args.tokens, "apart"))
        report("prompts in one batch, decode batched", alone,
               run(bare, prompts, args.tokens, "batched"))
        report("prompts arriving mid-stream", alone, run(bare, prompts, args.tokens, "late"))
        long = bare.tokenize(SPLIT_PROMPT)
        whole = split_prompt(bare, long, 0)
        differ = [k for k in range(1, len(long)) if not np.array_equal(
            whole, split_prompt(bare, long, k))]
        print(f"a {len(long)}-token prompt cut in two batches at k: last-token logits differ "
              f"from one batch for {len(differ)} of {len(long) - 1} cuts (k = {differ[:12]}...)")
        at_zero = placed(bare, long, 0)
        moved = {k: float(np.max(np.abs(at_zero - placed(bare, long, k))))
                 for k in (1, 8, 16, 37, 64, 256)}
        print("the same prompt after k cells of another sequence, max |diff| of its last "
              "logits: " + ", ".join(f"k={k} {d:.3g}" for k, d in moved.items()))
    finally:
        bare.close()


if __name__ == "__main__":
    main()
