"""Memory of each KV-cache mode: ggufllm's arithmetic (``kv_cache_bytes``) beside what
llama.cpp allocates (its ``llama_kv_cache: size = ...`` log lines), and the arithmetic for
gpt-oss-20b from its config (24 layers, 8 KV heads x 64, even layers windowed to 128).

    python benchmarks/kv_memory.py [--model PATH ...] [--n-ctx 4096] [--n-seq 4]

``--n-ctx`` is per sequence; the pool holds n_ctx x n_seq cells (one unified cache).
"""

from __future__ import annotations

import argparse
import logging
import re

import llama_cpp.llama_cpp as lib

from ggufllm.engine.native import NativeModel
from ggufllm.gguf_file import read_gguf_header
from ggufllm.kvlayout import KV_TYPES, KVLayout, kv_cache_bytes
from ggufllm.resolve import default_model_path

MiB = 1 << 20
_SIZE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, .* +\d+/(\d+) seqs")


class _Sizes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.mib: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = _SIZE.search(record.getMessage())
        if m:
            self.mib.append(float(m[1]))


def allocated_mib(model: NativeModel, *, n_ctx: int, n_seq: int, kv_type: str,
                  swa_full: bool) -> float | None:
    """What llama.cpp allocates for a unified cache of this mode (None: it refused)."""
    log = logging.getLogger("ggufllm.llama_cpp")
    sizes = _Sizes()
    log.addHandler(sizes)
    log.setLevel(logging.DEBUG)
    try:
        p = lib.llama_context_default_params()
        p.n_ctx, p.n_seq_max, p.kv_unified, p.swa_full = n_ctx, n_seq, True, swa_full
        p.type_k = p.type_v = int(KV_TYPES[kv_type])
        p.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx = lib.llama_init_from_model(model.ptr, p)
        if not ctx:
            return None
        lib.llama_free(ctx)
    finally:
        log.removeHandler(sizes)
    return sum(sizes.mib)


def rows(layout: KVLayout, n_ctx: int, n_seq: int, model: NativeModel | None):
    for kv_type in KV_TYPES:
        for swa_full in (True, False):
            if swa_full is False and not any(layout.swa):
                continue
            want = kv_cache_bytes(layout, n_ctx=n_ctx, n_seq=n_seq, kv_type=kv_type,
                                  swa_full=swa_full)
            problem = layout.kv_type_problem(kv_type)
            got = "-"
            if model is not None:
                mib = None if problem else allocated_mib(model, n_ctx=n_ctx, n_seq=n_seq,
                                                         kv_type=kv_type, swa_full=swa_full)
                got = "refused" if mib is None else f"{mib:.2f}"
            yield (kv_type, str(swa_full), f"{want.full_bytes / MiB:.2f}",
                   f"{want.swa_bytes / MiB:.2f}", f"{want.total / MiB:.2f}", got)


def show(title: str, table) -> None:
    print(f"\n{title}\n| type | swa_full | full layers MiB | window layers MiB | total MiB "
          "| llama.cpp allocates MiB |\n|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="GGUF file(s); default: the embedded model")
    ap.add_argument("--n-ctx", type=int, default=4096, help="tokens per sequence")
    ap.add_argument("--n-seq", type=int, default=4, help="sequences (slots)")
    args = ap.parse_args()
    n_ctx = args.n_ctx * args.n_seq
    show(f"gpt-oss-20b (arithmetic), {args.n_seq} x {args.n_ctx} tokens",
         rows(KVLayout.gpt_oss_20b(), n_ctx, args.n_seq, None))
    for path in args.model or [str(default_model_path())]:
        model = NativeModel(path)
        try:
            layout = KVLayout.from_gguf(read_gguf_header(path))
            show(f"{path}, {args.n_seq} x {args.n_ctx} tokens",
                 list(rows(layout, n_ctx, args.n_seq, model)))
        finally:
            model.close()


if __name__ == "__main__":
    main()
