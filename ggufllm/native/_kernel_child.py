"""The child side of the CPU kernel self-test (see :mod:`ggufllm.native.kernels`); run as a script.

It imports nothing from ggufllm (fast start, nothing shared with the parent):
loads the tiny model with llama.cpp's extra buffer types on (the repacked
layouts, AMX), decodes a 64-token prompt page and a few single tokens, and
prints one line: ``ok<TAB>{json}`` when every logit came out finite, ``nan<TAB>{json}``
when some did not, ``refused<TAB>reason`` when llama.cpp would not load it. A
kernel that crashes kills only this process; the parent sees the signal.

``GGUFLLM_KERNEL_FAULT`` injects a fault for the tests: ``signal`` (SIGSEGV at
the first decode), ``hang`` (never returns).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import signal
import sys
import time

PROMPT = 64  # one prompt page of the engine
STEPS = 4
_BUFFER = re.compile(r"load_tensors:\s+(\S+) model buffer size")


def main(path: str, n_threads: int) -> int:
    import llama_cpp.llama_cpp as lib

    log: list[str] = []

    @lib.llama_log_callback
    def on_log(_level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        log.append(text.decode("utf-8", "replace"))

    lib.llama_log_set(on_log, ctypes.c_void_p(0))
    # run as a script, this folder is on sys.path: backends.py without the ggufllm package
    from backends import load_backends

    load_backends()  # a cpu-portable build's CPU modules (a no-op otherwise)
    lib.llama_backend_init()
    params = lib.llama_model_default_params()
    params.n_gpu_layers = 0  # the CPU kernels are what is tested
    params.use_extra_bufts = True
    model = lib.llama_model_load_from_file(path.encode(), params)
    if not model:
        errors = [line.strip() for line in log if "error" in line.lower()]
        print("refused\t" + (errors[-1] if errors else "llama.cpp did not load the test model"))
        return 0
    buffers = sorted({m.group(1) for line in log if (m := _BUFFER.search(line))})
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = 256
    cparams.n_batch = cparams.n_ubatch = PROMPT
    cparams.n_threads = cparams.n_threads_batch = n_threads
    cparams.no_perf = True
    ctx = lib.llama_init_from_model(model, cparams)
    if not ctx:
        print("refused\tllama.cpp could not create a context for the test model")
        return 0
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    fault = os.environ.get("GGUFLLM_KERNEL_FAULT", "")
    batch = lib.llama_batch_init(PROMPT, 0, 1)
    finite = True
    started = time.perf_counter()
    for step in range(1 + STEPS):
        tokens = [(7 * i + 3) % n_vocab for i in range(PROMPT)] if step == 0 else [step]
        first = 0 if step == 0 else PROMPT + step - 1
        batch.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, first + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        if fault == "signal":
            os.kill(os.getpid(), signal.SIGSEGV)
        if fault == "hang":
            while True:
                time.sleep(60)
        rc = lib.llama_decode(ctx, batch)
        if rc != 0:
            print(f"refused\tllama_decode returned {rc} on the test model")
            return 0
        for row in range(len(tokens)):
            logits = lib.llama_get_logits_ith(ctx, row)
            if not all(math.isfinite(logits[j]) for j in range(n_vocab)):
                finite = False
    facts = {"buffers": buffers, "decode_s": round(time.perf_counter() - started, 3)}
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
    print(("ok" if finite else "nan") + "\t" + json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
