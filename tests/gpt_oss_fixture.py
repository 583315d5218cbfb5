"""A tiny gpt-oss checkpoint in the exact on-disk layout of openai/gpt-oss-20b.

Dimensions are tiny, everything else is real: MXFP4 expert blocks/scales, BF16
elsewhere, two safetensors shards with an index, and the real o200k_harmony
tokenizer built offline from the o200k_base ranks shipped by ``bpe-openai``
plus the gpt-oss special tokens (ids 199998-201087, harmony specification).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

VOCAB_SIZE = 201088
# Named gpt-oss special tokens (openai/harmony, public_encodings.rs); the other
# ids from 199998 to 201087 are <|reserved_N|>.
NAMED_SPECIALS = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>",
    200003: "<|constrain|>", 200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>",
    200008: "<|message|>", 200012: "<|call|>", 200018: "<|endofprompt|>",
}

TINY_CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "pad_token_id": 199999,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_types": ["sliding_attention", "full_attention"],
    "max_position_embeddings": 131072,
    "num_attention_heads": 16,
    "num_experts_per_tok": 2,
    "experts_per_token": 2,
    "num_hidden_layers": 2,
    "num_key_value_heads": 4,
    "num_local_experts": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn",
                     "truncate": False},
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 8,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": VOCAB_SIZE,
    "quantization_config": {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4",
    },
}

# The real layer count (24, alternating sliding/full) with rows of 256, the K-quant
# super-block, so that Q4_K_M picks real K-quants and its per-layer recipe is exercised.
REAL_DEPTH_CONFIG = TINY_CONFIG | {
    "num_hidden_layers": 24, "hidden_size": 256, "num_attention_heads": 16, "head_dim": 16,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)


def special_tokens() -> list[str]:
    return [NAMED_SPECIALS.get(i, f"<|reserved_{i}|>") for i in range(199998, VOCAB_SIZE)]


def write_tokenizer(folder: Path) -> None:
    """tokenizer.json for o200k_harmony, through transformers' tiktoken converter."""
    import bpe_openai
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = bpe_openai.get_encoding("o200k_base")
    converter = TikTokenConverter(vocab_file="o200k_base", pattern=enc._pat_str,
                                  extra_special_tokens=special_tokens())
    converter.load_tiktoken_bpe = lambda _url: enc._mergeable_ranks  # offline: ranks in hand
    tok = converter.converted()
    assert tok.get_vocab_size() == VOCAB_SIZE
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))


def _bf16(values: np.ndarray) -> np.ndarray:
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for b in blobs:
            f.write(b)


def tiny_tensors(cfg: dict, seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    h, f, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    nq, nkv, d, V = (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                     cfg["vocab_size"])

    def bf(*shape: int, scale: float = 0.02, center: float = 0.0) -> tuple[str, np.ndarray]:
        return "BF16", _bf16(center + scale * rng.standard_normal(shape, dtype=np.float32))

    def mx(E: int, rows: int, cols: int) -> tuple[tuple[str, np.ndarray], tuple[str, np.ndarray]]:
        blocks = rng.integers(0, 256, (E, rows, cols // 32, 16), dtype=np.uint8)
        scales = rng.integers(119, 124, (E, rows, cols // 32), dtype=np.uint8)  # 2^-8..2^-4
        return ("U8", blocks), ("U8", scales)

    t: dict[str, tuple[str, np.ndarray]] = {"model.embed_tokens.weight": bf(V, h, scale=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        gub, gus = mx(E, 2 * f, h)
        db, ds = mx(E, h, f)
        t |= {
            p + "input_layernorm.weight": bf(h, scale=0.1, center=1.0),
            p + "post_attention_layernorm.weight": bf(h, scale=0.1, center=1.0),
            p + "self_attn.q_proj.weight": bf(nq * d, h, scale=0.2),
            p + "self_attn.q_proj.bias": bf(nq * d),
            p + "self_attn.k_proj.weight": bf(nkv * d, h, scale=0.2),
            p + "self_attn.k_proj.bias": bf(nkv * d),
            p + "self_attn.v_proj.weight": bf(nkv * d, h, scale=0.2),
            p + "self_attn.v_proj.bias": bf(nkv * d),
            p + "self_attn.o_proj.weight": bf(h, nq * d, scale=0.1),
            p + "self_attn.o_proj.bias": bf(h),
            p + "self_attn.sinks": bf(nq, scale=1.0),
            p + "mlp.router.weight": bf(E, h, scale=0.2),
            p + "mlp.router.bias": bf(E),
            p + "mlp.experts.gate_up_proj_blocks": gub,
            p + "mlp.experts.gate_up_proj_scales": gus,
            p + "mlp.experts.gate_up_proj_bias": bf(E, 2 * f),
            p + "mlp.experts.down_proj_blocks": db,
            p + "mlp.experts.down_proj_scales": ds,
            p + "mlp.experts.down_proj_bias": bf(E, h),
        }
    t["model.norm.weight"] = bf(h, scale=0.1, center=1.0)
    t["lm_head.weight"] = bf(V, h, scale=0.2)
    return t


def write_checkpoint(folder: Path, tokenizer_from: Path | None = None, *,
                     config: dict | None = None, seed: int = 0) -> Path:
    """Writes the tiny checkpoint into ``folder`` (tokenizer files copied from
    ``tokenizer_from`` when given, else built)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(config or TINY_CONFIG)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012],
         "pad_token_id": 199999}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((tokenizer_from / name).read_bytes())
    else:
        write_tokenizer(folder)
    tensors = tiny_tensors(cfg, seed)
    names = list(tensors)
    half = len(names) // 2
    shards = {"model-00000-of-00001.safetensors": names[:half],
              "model-00001-of-00001.safetensors": names[half:]}
    weight_map = {}
    for shard, keys in shards.items():
        write_safetensors(folder / shard, {k: tensors[k] for k in keys})
        weight_map |= {k: shard for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(a.nbytes for _, a in tensors.values())},
         "weight_map": weight_map}))
    return folder


# Converting the tiny checkpoint costs mostly its 201,088-token vocabulary (parsing and
# writing 647k strings) and the two matrices with a row per token. A test of something
# the vocabulary's size cannot change (atomic output, the per-layer recipe, the encoders,
# logits) runs on the first SMALL_VOCAB tokens of the same tokenizer instead.
SMALL_VOCAB = 4096


def write_small_vocab_tokenizer(folder: Path, harmony_tokenizer: Path,
                                n_vocab: int = SMALL_VOCAB) -> Path:
    """o200k_harmony cut to its first ``n_vocab`` tokens and the merges among them (still a
    byte-level BPE: the 256 byte tokens come first), without the special tokens."""
    data = json.loads((harmony_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    vocab = {text: i for text, i in model["vocab"].items() if i < n_vocab}
    model["vocab"] = vocab
    model["merges"] = [m for m in model["merges"]
                       if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    data["added_tokens"] = []
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (folder / "tokenizer_config.json").write_bytes(
        (harmony_tokenizer / "tokenizer_config.json").read_bytes())
    return folder


def small_vocab_config(config: dict = TINY_CONFIG, n_vocab: int = SMALL_VOCAB) -> dict:
    """``config`` with ``n_vocab`` tokens (no special token id beyond them: transformers
    checks that its padding id is a row of the embedding)."""
    return json.loads(json.dumps(config)) | {"vocab_size": n_vocab, "pad_token_id": None,
                                             "eos_token_id": None}
