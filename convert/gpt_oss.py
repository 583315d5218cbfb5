"""gpt-oss: what is specific to it — config keys, metadata, tensor plan, MXFP4 experts.

Generic naming comes from ``gguf.TensorNameMap``; this module holds only the
gpt-oss facts: the interleaved gate/up rows, MXFP4 blocks and scales, sinks,
the sliding window and YaRN keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from .checkpoint import Checkpoint
from .quant import (
    ExpertType,
    OutType,
    encode,
    encode_rows,
    expert_type,
    matrix_type,
    mxfp4_from_hf,
    mxfp4_hf_to_float,
)

__all__ = ["HF_ARCHITECTURE", "check_config", "check_tensors", "write_metadata", "plan",
           "TensorJob"]

HF_ARCHITECTURE = "GptOssForCausalLM"
ARCH = gguf.MODEL_ARCH.GPT_OSS
# llama.cpp's YaRN betas for gpt-oss (llama-hparams.h defaults; its gpt-oss loader
# does not read rope.scaling.yarn_beta_fast/slow from the file)
YARN_BETAS_LLAMA_CPP_USES = {"beta_fast": 32.0, "beta_slow": 1.0}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "num_local_experts", "vocab_size",
             "rms_norm_eps", "rope_theta", "sliding_window", "max_position_embeddings")


@dataclass(frozen=True)
class TensorJob:
    """One GGUF tensor: where it comes from and how it is encoded.

    ``produce`` returns exactly what is written (floats or encoded bytes);
    ``reference`` returns the source values as float32, for ``verify``.
    """

    name: str
    shape: tuple[int, ...]  # element shape, numpy order (last axis = row)
    qtype: Q
    source: str
    source_type: str
    produce: Callable[[], np.ndarray]
    reference: Callable[[], np.ndarray]


def _experts_used(cfg: dict[str, Any]) -> int | None:
    return cfg.get("num_experts_per_tok", cfg.get("experts_per_token"))


def check_config(cfg: dict[str, Any]) -> list[str]:
    """Every problem with ``config.json`` for a gpt-oss conversion."""
    problems = [f"config.json: missing {k}" for k in _REQUIRED if k not in cfg]
    if _experts_used(cfg) is None:
        problems.append("config.json: missing num_experts_per_tok")
    for k in _REQUIRED:
        v = cfg.get(k)
        if k in cfg and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            problems.append(f"config.json: {k} = {v!r} is not a positive number")
    if problems:
        return problems
    if cfg["intermediate_size"] % 32 or cfg["hidden_size"] % 32:
        problems.append("config.json: hidden_size and intermediate_size must be multiples of 32 "
                        "(the MXFP4 block)")
    rs = cfg.get("rope_scaling") or {}
    if rs and rs.get("rope_type", rs.get("type")) not in ("yarn", None):
        problems.append(f"config.json: rope_scaling type {rs.get('rope_type')!r} is not yarn")
    for key, used in YARN_BETAS_LLAMA_CPP_USES.items():
        if rs.get(key, used) != used:
            # written to the GGUF all the same, but this llama.cpp's gpt-oss loader does
            # not read it: the model would run with another rope than it was trained with
            problems.append(f"config.json: rope_scaling.{key} = {rs[key]!r}; llama.cpp's gpt-oss "
                            f"loader ignores it and always uses {used}")
    return problems


def _expected(cfg: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Source tensor name -> (dtype, shape) for the MXFP4 checkpoint layout."""
    h, f, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    nq, nkv, d, V = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], \
        cfg["vocab_size"]
    out = {"model.embed_tokens.weight": ("BF16", (V, h)), "model.norm.weight": ("BF16", (h,)),
           "lm_head.weight": ("BF16", (V, h))}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": ("BF16", (h,)),
            p + "post_attention_layernorm.weight": ("BF16", (h,)),
            p + "self_attn.q_proj.weight": ("BF16", (nq * d, h)),
            p + "self_attn.q_proj.bias": ("BF16", (nq * d,)),
            p + "self_attn.k_proj.weight": ("BF16", (nkv * d, h)),
            p + "self_attn.k_proj.bias": ("BF16", (nkv * d,)),
            p + "self_attn.v_proj.weight": ("BF16", (nkv * d, h)),
            p + "self_attn.v_proj.bias": ("BF16", (nkv * d,)),
            p + "self_attn.o_proj.weight": ("BF16", (h, nq * d)),
            p + "self_attn.o_proj.bias": ("BF16", (h,)),
            p + "self_attn.sinks": ("BF16", (nq,)),
            p + "mlp.router.weight": ("BF16", (E, h)),
            p + "mlp.router.bias": ("BF16", (E,)),
            p + "mlp.experts.gate_up_proj_blocks": ("U8", (E, 2 * f, h // 32, 16)),
            p + "mlp.experts.gate_up_proj_scales": ("U8", (E, 2 * f, h // 32)),
            p + "mlp.experts.gate_up_proj_bias": ("BF16", (E, 2 * f)),
            p + "mlp.experts.down_proj_blocks": ("U8", (E, h, f // 32, 16)),
            p + "mlp.experts.down_proj_scales": ("U8", (E, h, f // 32)),
            p + "mlp.experts.down_proj_bias": ("BF16", (E, h)),
        }
    return out


def check_tensors(ckpt: Checkpoint) -> list[str]:
    """Every missing, extra or mis-shaped tensor against the config."""
    problems = []
    expected = _expected(ckpt.config)
    for name, (dtype, shape) in expected.items():
        t = ckpt.tensors.get(name)
        if t is None:
            problems.append(f"missing tensor {name}")
        elif t.shape != shape:
            problems.append(f"{name}: shape {list(t.shape)}, config says {list(shape)}")
        elif t.dtype != dtype and not (dtype == "BF16" and t.dtype in ("F16", "F32")):
            problems.append(f"{name}: dtype {t.dtype}, expected {dtype}")
    for name in ckpt.tensors:
        if name not in expected:
            problems.append(f"unexpected tensor {name}")
    return problems


def write_metadata(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    """The hyper-parameters llama.cpp's gpt-oss loader reads."""
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(int(_experts_used(cfg) or 0))
    w.add_expert_feed_forward_length(cfg["intermediate_size"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_rope_freq_base(cfg["rope_theta"])
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
        # llama.cpp's own converter writes them; so do we, so that the file says what
        # the checkpoint says (check_config refuses values llama.cpp would not apply)
        w.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast", 32.0)))
        w.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow", 1.0)))


def plan(ckpt: Checkpoint, out: OutType, experts: ExpertType) -> list[TensorJob]:
    """Every output tensor, in file order, with its encoding."""
    cfg = ckpt.config
    n_layers = cfg["num_hidden_layers"]
    names = gguf.TensorNameMap(ARCH, n_layers)
    src = ckpt.tensors
    jobs: list[TensorJob] = []

    def gguf_name(hf: str, suffix: str) -> str:
        mapped = names.get_name(hf)
        if mapped is None:
            raise KeyError(hf)
        return mapped + suffix

    def add_plain(hf_name: str, gname: str, layer: int | None) -> None:
        t = src[hf_name]
        shape = t.shape
        if len(shape) == 1 or "ffn_gate_inp" in gname:
            qtype = Q.F32  # norms, biases, sinks and the router stay F32, as llama.cpp keeps them
        else:
            qtype = matrix_type(out, gname, shape[-1], layer, n_layers)
        produce = ((lambda t=t, q=qtype: encode(t.float32(), q)) if len(shape) == 1
                   else (lambda t=t, q=qtype: encode_rows(t, q)))
        jobs.append(TensorJob(gname, shape, qtype, hf_name, t.dtype, produce, t.float32))

    def add_expert_bias(hf_name: str, gname: str, rows: slice) -> None:
        t = src[hf_name]
        values = lambda: t.float32()[:, rows]  # noqa: E731
        shape = (t.shape[0], t.shape[1] // (2 if rows.step == 2 else 1))
        jobs.append(TensorJob(gname, shape, Q.F32, f"{hf_name}[:, {_fmt(rows)}]", t.dtype,
                              lambda: encode(values(), Q.F32), values))

    def add_expert(prefix: str, gname: str, rows: slice) -> None:
        blocks, scales = src[prefix + "_blocks"], src[prefix + "_scales"]
        E, R, nb, _ = blocks.shape
        n_rows = R // (2 if rows.step == 2 else 1)
        shape = (E, n_rows, nb * 32)
        qtype = expert_type(experts)
        parts = lambda: (blocks.array()[:, rows], scales.array()[:, rows])  # noqa: E731
        values = lambda: mxfp4_hf_to_float(*parts())  # noqa: E731
        def produce() -> np.ndarray:
            if qtype is Q.MXFP4:  # the checkpoint's codes, repacked bit for bit
                return mxfp4_from_hf(*parts())
            return encode(values(), qtype)

        jobs.append(TensorJob(gname, shape, qtype, f"{prefix}_blocks/_scales[:, {_fmt(rows)}]",
                              "MXFP4", produce, values))

    add_plain("model.embed_tokens.weight", "token_embd.weight", None)
    every, even, odd = slice(None), slice(0, None, 2), slice(1, None, 2)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for part in ("input_layernorm", "post_attention_layernorm"):
            add_plain(p + part + ".weight", gguf_name(p + part, ".weight"), i)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            base = p + "self_attn." + proj
            add_plain(base + ".weight", gguf_name(base, ".weight"), i)
            add_plain(base + ".bias", gguf_name(base, ".bias"), i)
        add_plain(p + "self_attn.sinks", gguf_name(p + "self_attn.sinks", ".weight"), i)
        add_plain(p + "mlp.router.weight", gguf_name(p + "mlp.router", ".weight"), i)
        add_plain(p + "mlp.router.bias", gguf_name(p + "mlp.router", ".bias"), i)
        gate = gguf_name(p + "mlp.experts.gate_proj", "")
        up = gguf_name(p + "mlp.experts.up_proj", "")
        down = gguf_name(p + "mlp.experts.down_proj", "")
        # gate_up interleaves rows: even = gate, odd = up
        add_expert(p + "mlp.experts.gate_up_proj", gate + ".weight", even)
        add_expert(p + "mlp.experts.gate_up_proj", up + ".weight", odd)
        add_expert(p + "mlp.experts.down_proj", down + ".weight", every)
        add_expert_bias(p + "mlp.experts.gate_up_proj_bias", gate + ".bias", even)
        add_expert_bias(p + "mlp.experts.gate_up_proj_bias", up + ".bias", odd)
        add_expert_bias(p + "mlp.experts.down_proj_bias", down + ".bias", every)
    add_plain("model.norm.weight", "output_norm.weight", None)
    add_plain("lm_head.weight", "output.weight", None)
    return jobs


def _fmt(s: slice) -> str:
    return {None: ":", 2: "::2"}.get(s.step, ":") if s.start in (None, 0) else "1::2"
