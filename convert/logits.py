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


def _q8_0_round_trip(x):  # torch.Tensor -> torch.Tensor
    """What ggml's CPU backend does to activations before a quantized matmul: Q8_0
    blocks of 32, scale max|x|/127 stored as fp16, values rounded to int8."""
    import torch

    shape = x.shape
    blocks = x.reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    d = amax / 127
    # ggml multiplies by 127/amax (not 1/d) and rounds half to even
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)
    return (q * d.to(torch.float16).to(torch.float32)).reshape(shape)


def _emulate_expert_activations(experts) -> None:
    """Rounds the inputs of both expert matmuls of one GptOssExperts module to Q8_0."""

    def forward(hidden_states, router_indices=None, routing_weights=None):
        import torch

        out = torch.zeros_like(hidden_states)
        for e in range(experts.num_experts):
            mask = router_indices == e  # [tokens, top_k]
            token_idx, top_k_pos = torch.where(mask)
            if token_idx.numel() == 0:
                continue
            x = _q8_0_round_trip(hidden_states[token_idx])
            gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
            gated = experts._apply_gate(gate_up)
            y = _q8_0_round_trip(gated) @ experts.down_proj[e] + experts.down_proj_bias[e]
            out.index_add_(0, token_idx, y * routing_weights[token_idx, top_k_pos, None])
        return out

    experts.forward = forward


def reference_logits(checkpoint: str | Path, tokens: list[int], *,
                     emulate_q8_0_activations: bool = False) -> np.ndarray:
    """transformers' fp32 forward pass (MXFP4 experts dequantized) on ``tokens``.

    Args:
        emulate_q8_0_activations: round the expert matmul inputs to Q8_0 as
            llama.cpp's CPU backend does before MXFP4 (or other quantized) experts.
    """
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config  # type: ignore[attr-defined]

    model = GptOssForCausalLM.from_pretrained(
        checkpoint, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager").eval()
    if emulate_q8_0_activations:
        for layer in model.model.layers:
            _emulate_expert_activations(layer.mlp.experts)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def compare_logits(gguf_path: str | Path, checkpoint: str | Path, n_tokens: int = 64,
                   seed: int = 1, *, emulate_q8_0_activations: bool = False) -> tuple[float, float]:
    """(relative error of all logits, share of positions with the same argmax)."""
    tokens = np.random.default_rng(seed).integers(0, 199998, n_tokens).tolist()
    ref = reference_logits(checkpoint, tokens, emulate_q8_0_activations=emulate_q8_0_activations)
    got = llama_logits(gguf_path, tokens)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return rel, float((got.argmax(-1) == ref.argmax(-1)).mean())
