"""Time to first token of follow-up questions over one document, and the memory of each cache mode.

Five questions over one ~1,500-token document: the first after clearing the
KV cache (cold), the next four reuse the document's cached prefix. Prints each
TTFT and the ratio mean(TTFT q2..q5) / TTFT q1 (target <= 0.15), then the KV
cache bytes of every cache type and window mode, for this model and for
gpt-oss-20b (arithmetic from the GGUF header; gpt-oss-20b's values are from its
config: 24 layers, 8 KV heads of 64, window 128).

    python benchmarks/kv_cache.py [--model PATH] [--ctx 4096] [--parallel 4]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from ggufllm import LLMService
from ggufllm.engine.kvcache import KVLayout, kv_cache_bytes
from ggufllm.gguf_file import read_gguf_header
from ggufllm.resolve import default_model_path

PARAGRAPH = ("The Zorblat festival is held every spring in the town of Quenby, on the river "
             "Wendle. It began in 1872 when the miller Ada Fenwick baked a loaf the size of a "
             "cartwheel. Today visitors race wooden boats, eat plum cake and crown a Bread Queen, "
             "and the brass band plays until midnight on the old stone bridge. ")
QUESTIONS = ["Where is the festival held?", "Who baked the first loaf?", "What do visitors eat?",
             "Where does the band play?", "When did the festival begin?"]
def document(svc: LLMService, n_tokens: int) -> str:
    text = PARAGRAPH
    while len(svc._engine.tokenize(text)) < n_tokens:
        text += PARAGRAPH
    return text


def ttft(svc: LLMService, question: str, context: str) -> float:
    start = time.perf_counter()
    first = 0.0
    with svc.stream(question, context, temperature=0.0, max_tokens=8) as stream:
        for chunk in stream:
            if chunk.token_ids:
                first = time.perf_counter() - start
                break
    return first


def memory_table(layout: KVLayout, name: str, ctx: int, parallel: int) -> None:
    print(f"KV cache of {name}, {parallel} x {ctx} tokens:")
    for swa_full in (True, False):
        row = []
        for kv_type in ("f16", "q8_0", "q4_0"):
            if layout.kv_type_problem(kv_type):
                row.append(f"{kv_type}  refused")
                continue
            size = kv_cache_bytes(layout, n_ctx=ctx * parallel, kv_type=kv_type,
                                  swa_full=swa_full, n_seq=parallel, n_ubatch=512)
            row.append(f"{kv_type} {size.total / 2**20:8.1f} MiB")
        print(f"  swa_full={swa_full!s:5}: " + "   ".join(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=1500)
    args = ap.parse_args()
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    path = args.model or str(default_model_path())
    svc = LLMService(path, max_length=args.ctx, n_parallel=args.parallel)
    svc.load()
    doc = document(svc, args.doc_tokens)
    svc.clear_kv_cache()
    times = []
    for q in QUESTIONS:
        t = ttft(svc, q, doc)
        times.append(t)
        print(f"TTFT {t * 1000:8.1f} ms  {q}")
    ratio = statistics.mean(times[1:]) / times[0]
    kv = svc.get_model_info()["kv_cache"]
    print(f"document {len(svc._engine.tokenize(doc))} tokens; mean TTFT of questions 2-5 / "
          f"cold = {ratio:.3f} (target <= 0.15); tokens reused {kv['tokens_reused']}, "
          f"evaluated {kv['tokens_evaluated']}")
    svc.close()
    memory_table(KVLayout.from_gguf(read_gguf_header(path, probe=False)), path, args.ctx, args.parallel)
    memory_table(KVLayout.gpt_oss_20b(), "gpt-oss-20b", args.ctx, args.parallel)


if __name__ == "__main__":
    main()
