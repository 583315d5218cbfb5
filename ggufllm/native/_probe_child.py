"""The child side of the probe load (see :mod:`ggufllm.gguf_probe`); run as a script.

It imports nothing from ggufllm (fast start, nothing shared with the parent):
loads the model with ``no_alloc`` (hyper-parameters, vocabulary and tensor
shapes, no weights read), tokenizes and detokenizes a sample text, and prints
``ok`` or ``refused<TAB>llama.cpp's last error line``. An abort kills only this
process; the parent sees the signal.
"""

from __future__ import annotations

import ctypes
import sys

# every byte class a prompt can bring: ASCII, newline/tab, accents, CJK, emoji, a lone
# control character, and text that looks like special tokens
SAMPLE = "Hello, world!\n\tThủ đô 東京 🙂 \x07 <|end|><end_of_turn><|im_end|></s> 0123"


def main(path: str) -> int:
    import llama_cpp.llama_cpp as lib

    errors: list[str] = []

    @lib.llama_log_callback
    def log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            errors.append(text.decode("utf-8", "replace").strip())

    lib.llama_log_set(log, ctypes.c_void_p(0))
    # run as a script, this folder is on sys.path: backends.py without the ggufllm package
    from backends import load_backends

    load_backends()  # a cpu-portable build's CPU modules (a no-op otherwise)
    lib.llama_backend_init()
    params = lib.llama_model_default_params()
    params.no_alloc = True
    params.load_mode = lib.LLAMA_LOAD_MODE_NONE  # no_alloc maps nothing (GGML_ASSERT(!no_alloc) under mmap)
    params.lazy_mode = lib.LLAMA_LAZY_MODE_OFF
    params.n_gpu_layers = 0
    params.use_extra_bufts = False
    model = lib.llama_model_load_from_file(path.encode(), params)
    if not model:
        reasons = [e for e in errors if "error loading model" in e] or errors
        print("refused\t" + (reasons[0] if reasons else "no reason given"))
        return 0
    vocab = lib.llama_model_get_vocab(model)
    data = SAMPLE.encode()
    for special in (False, True):
        buf = (lib.llama_token * (len(data) + 16))()
        n = lib.llama_tokenize(vocab, data, len(data), buf, len(buf), True, special)
        piece = ctypes.create_string_buffer(256)
        for token in buf[: max(n, 0)]:
            lib.llama_token_to_piece(vocab, token, piece, 256, 0, special)
    lib.llama_model_free(model)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
