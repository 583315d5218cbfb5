"""Time to first token of follow-up questions over documents, and the memory of each cache mode.

One document: five questions over one ~1,500-token document, the first after
clearing the KV cache (cold), the next four reuse the document's cached prefix.
Prints each TTFT and the ratio mean(TTFT q2..q5) / TTFT q1 (target <= 0.15).

Three documents (``--three-docs``): documents A, B, C asked in turn (A B C A B C
A B C) through one slot, so that each new document pushes the last one out to the
RAM cache; then the cache is saved, and a new process loads it and asks each
document again (with ``CURRENT_DATE`` at its default and, for contrast on
gpt-oss, a date set). For each document: the ratio of its follow-ups' mean TTFT to
its cold one (target <= 0.15). ``--gpt-oss-fixture`` runs it on the tiny gpt-oss
checkpoint the tests build (window 8, real o200k_harmony tokenizer);
``--reuse exact`` runs the same with ``KV_REUSE=exact``.

Then the KV cache bytes of every cache type and window mode, for this model and
for gpt-oss-20b (arithmetic from the GGUF header; gpt-oss-20b's values are from
its config: 24 layers, 8 KV heads of 64, window 128).

    python benchmarks/kv_cache.py [--model PATH] [--ctx 4096] [--parallel 4]
    python benchmarks/kv_cache.py --three-docs [--gpt-oss-fixture] [--reuse fast|exact]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ggufllm import LLMService
from ggufllm.gguf_file import read_gguf_header
from ggufllm.kvlayout import KVLayout, kv_cache_bytes
from ggufllm.resolve import default_model_path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = [
    "The Zorblat festival is held every spring in the town of Quenby, on the river Wendle. ",
    "Mount Ferrow is the tallest peak of the Ulm range; its north face was first climbed "
    "in 1931 by a team of four shepherds from the valley of Sarn. ",
    "The Velloran Library keeps nine thousand maps of coasts that no longer exist, drawn "
    "by monks who sailed the northern sea for three centuries. ",
]
FOLLOW_UPS = ["What is this document about?", "Name one fact from the document.",
              "Summarize the document in one line."]
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


def topic_document(svc: LLMService, topic: str, n_tokens: int) -> str:
    text = topic
    while len(svc._engine.tokenize(text)) < n_tokens:
        text += topic
    return text


def _ttft_cached(svc: LLMService, question: str, context: str) -> tuple[float, int]:
    """(TTFT, cached prompt tokens) of one greedy question."""
    start = time.perf_counter()
    first, cached = 0.0, 0
    with svc.stream(question, context, temperature=0.0, max_tokens=4) as stream:
        for chunk in stream:
            if first == 0.0 and (chunk.token_ids or chunk.finish_reason):
                first = time.perf_counter() - start
            if chunk.timings is not None:
                cached = chunk.timings.n_cached
    return first, cached


def three_docs(path: str, args: argparse.Namespace) -> None:
    settings = dict(max_length=args.ctx, n_parallel=1, kv_reuse=args.reuse)
    with LLMService(path, **settings) as svc:
        docs = [topic_document(svc, t, args.doc_tokens) for t in TOPICS]
        n_doc = [len(svc._engine.tokenize(d)) for d in docs]
        cold = []
        for doc in docs:
            t, cached = _ttft_cached(svc, "What is this document about?", doc)
            cold.append(t)
        follow: list[list[float]] = [[], [], []]
        reused: list[list[int]] = [[], [], []]
        for rnd in range(args.rounds):
            for i, doc in enumerate(docs):
                t, cached = _ttft_cached(svc, FOLLOW_UPS[(rnd + 1) % len(FOLLOW_UPS)] +
                                         f" ({rnd})", doc)
                follow[i].append(t)
                reused[i].append(cached)
        kv = svc.get_model_info()["kv_cache"]
        print(f"KV_REUSE={args.reuse}, one slot, documents of {n_doc} tokens, "
              f"window {kv['n_swa']}, flash attention {svc.settings.flash_attn or 'auto'}")
        for i in range(3):
            ratio = statistics.mean(follow[i]) / cold[i]
            print(f"  document {'ABC'[i]}: cold TTFT {cold[i] * 1000:7.1f} ms, follow-ups "
                  f"{statistics.mean(follow[i]) * 1000:7.1f} ms (cached {reused[i]}), "
                  f"ratio {ratio:.3f} (target <= 0.15)")
        fd, file = tempfile.mkstemp(suffix=".kvcache")
        os.close(fd)
        n_saved = svc.save_kv_cache(file)
        harmony = svc.get_model_info().get("prompt_format") == "harmony"
    print(f"  saved {n_saved} prefixes; a new process loads them:")
    dates: list[str | None] = [None]
    if harmony:
        dates.append((datetime.date.today() + datetime.timedelta(days=1)).isoformat())
    try:
        for date in dates:
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            if date:
                env["CURRENT_DATE"] = date
            out = subprocess.run([sys.executable, __file__, "--child", file, "--model", path,
                                  "--ctx", str(args.ctx), "--reuse", args.reuse,
                                  "--doc-tokens", str(args.doc_tokens)], env=env,
                                 capture_output=True, text=True, check=True)
            child = json.loads(out.stdout.strip().splitlines()[-1])
            label = f"CURRENT_DATE={date}" if date else "CURRENT_DATE default (none)"
            for i in range(3):
                t, cached = child["runs"][i]
                print(f"  new process, {label}: document {'ABC'[i]} TTFT {t * 1000:7.1f} ms "
                      f"(cached {cached}), ratio to cold {t / cold[i]:.3f}")
    finally:
        os.unlink(file)


def child(file: str, path: str, args: argparse.Namespace) -> None:
    with LLMService(path, max_length=args.ctx, n_parallel=1, kv_reuse=args.reuse) as svc:
        svc.load_kv_cache(file)
        docs = [topic_document(svc, t, args.doc_tokens) for t in TOPICS]
        runs = [_ttft_cached(svc, "Who would read this document?", d) for d in docs]
    print(json.dumps({"runs": runs}))


def gpt_oss_fixture() -> str:
    """The tiny gpt-oss checkpoint of the tests, converted to Q8_0 (in a temporary folder)."""
    sys.path.insert(0, str(ROOT))
    from convert import convert
    from tests.gpt_oss_fixture import write_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="ggufllm-kvbench-"))
    checkpoint = write_checkpoint(folder / "checkpoint")
    return str(convert(checkpoint, folder / "tiny-q8_0.gguf", "q8_0").path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=1500)
    ap.add_argument("--three-docs", action="store_true")
    ap.add_argument("--gpt-oss-fixture", action="store_true")
    ap.add_argument("--reuse", choices=("fast", "exact"), default="fast")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    logging.getLogger("ggufllm").setLevel(logging.ERROR)
    if args.child:
        child(args.child, args.model, args)
        return
    if args.three_docs:
        path = gpt_oss_fixture() if args.gpt_oss_fixture else (args.model or
                                                               str(default_model_path()))
        three_docs(path, args)
        return
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
