"""llama.cpp's logits on a GGUF against transformers' GptOssForCausalLM (fp32) on the source.

For models small enough to run both on a CPU. Needs the ``reference`` extra
(torch, transformers). llama.cpp runs with an F32 KV cache and flash attention
off, one token per decode, so every position's logits come from the same path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ggufllm.engine.native import NativeModel

__all__ = ["llama_logits", "reference_logits", "compare_logits"]


def llama_logits(path: str | Path, tokens: list[int]) -> np.ndarray:
    """Logits ``[len(tokens), n_vocab]`` from llama.cpp, one decode per token."""
    import llama_cpp.llama_cpp as lib

    model = NativeModel(str(path))
    params = lib.llama_context_default_params()
    params.n_ctx = max(64, len(tokens) + 8)
    params.type_k = params.type_v = 0  # GGML_TYPE_F32
    params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = lib.llama_init_from_model(model.ptr, params)
    try:
        out, one = [], (lib.llama_token * 1)()
        for t in tokens:
            one[0] = t
            if lib.llama_decode(ctx, lib.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed")
            out.append(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1),
                                             shape=(model.n_vocab,)).copy())
        return np.array(out)
    finally:
        lib.llama_free(ctx)
        model.close()


def reference_logits(checkpoint: str | Path, tokens: list[int]) -> np.ndarray:
    """transformers' fp32 forward pass (MXFP4 experts dequantized) on ``tokens``."""
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(
        checkpoint, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def compare_logits(gguf_path: str | Path, checkpoint: str | Path, n_tokens: int = 64,
                   seed: int = 1) -> tuple[float, float]:
    """(relative error of all logits, share of positions with the same argmax)."""
    tokens = np.random.default_rng(seed).integers(0, 199998, n_tokens).tolist()
    ref = reference_logits(checkpoint, tokens)
    got = llama_logits(gguf_path, tokens)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return rel, float((got.argmax(-1) == ref.argmax(-1)).mean())
