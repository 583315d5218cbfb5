"""Every metadata key llama.cpp reads when it loads a gpt-oss GGUF, and what ours holds.

Read off the vendored llama.cpp (llama-cpp-python 0.3.36): ``llama-model-loader.cpp``
(constructor), ``llama-model.cpp`` (``load_hparams``, ``load_swa_pattern``),
``models/openai-moe.cpp`` (``load_arch_hparams``), ``llama-vocab.cpp`` (``load``)
and ``llama-arch.cpp`` (the key names). A key is either written, with the value the
checkpoint gives it, or left out because llama.cpp's default is right for gpt-oss,
and then ``default_fits`` says why for the checkpoint at hand. ``tests/test_convert.py``
holds our files to this table, so no key llama.cpp reads is silently defaulted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["KeyRule", "GPT_OSS_KEYS", "WRITTEN_BUT_NOT_READ", "ARRAY", "PRESENT"]

Config = dict[str, Any]
ARRAY = object()  # the key must hold an array (token lists)
PRESENT = object()  # the key must be there, with a value checked elsewhere


@dataclass(frozen=True)
class KeyRule:
    """``value(cfg, tok)``: what our file must hold (ARRAY for arrays); None: left out,
    and ``default_fits(cfg, tok)`` must then hold."""

    value: Callable[[Config, Config], Any] | None
    default_fits: Callable[[Config, Config], bool] | None = None


def _cfg(key: str) -> Callable[[Config, Config], Any]:
    return lambda cfg, _tok: cfg[key]


def _rope(key: str) -> Callable[[Config, Config], Any]:
    return lambda cfg, _tok: cfg["rope_scaling"][key]


def _const(v: Any) -> Callable[[Config, Config], Any]:
    return lambda _cfg_, _tok: v


def _always(_cfg_: Config, _tok: Config) -> bool:
    return True


def _swa_pattern_fits(cfg: Config, _tok: Config) -> bool:
    # load_swa_pattern(ml, 2) default: layer i is sliding iff i % 2 == 0
    types = cfg.get("layer_types") or []
    return all((t == "sliding_attention") == (i % 2 == 0) for i, t in enumerate(types))


_LEFT_OUT = KeyRule(None, _always)
A = "gpt-oss"

GPT_OSS_KEYS: dict[str, KeyRule] = {
    # llama-model-loader.cpp
    "general.architecture": KeyRule(_const("gpt-oss")),
    "general.file_type": KeyRule(_const(PRESENT)),  # set by --type (quant.FILE_TYPES)
    "split.count": _LEFT_OUT, "split.no": _LEFT_OUT, "split.tensors.count": _LEFT_OUT,
    # llama-model.cpp load_hparams
    "general.name": KeyRule(_const(PRESENT)),
    f"{A}.context_length": KeyRule(_cfg("max_position_embeddings")),
    f"{A}.embedding_length": KeyRule(_cfg("hidden_size")),
    f"{A}.embedding_length_out": _LEFT_OUT,  # defaults to embedding_length
    f"{A}.attention.causal": _LEFT_OUT,  # default true
    f"{A}.pooling_type": _LEFT_OUT, f"{A}.classifier.pooling_type": _LEFT_OUT,
    f"{A}.block_count": KeyRule(_cfg("num_hidden_layers")),
    f"{A}.nextn_predict_layers": _LEFT_OUT,  # no multi-token prediction layers
    f"{A}.expert_count": KeyRule(_cfg("num_local_experts")),
    f"{A}.expert_used_count": KeyRule(lambda cfg, _tok: cfg.get(
        "num_experts_per_tok", cfg.get("experts_per_token"))),
    f"{A}.expert_group_count": _LEFT_OUT, f"{A}.expert_group_used_count": _LEFT_OUT,
    f"{A}.feed_forward_length": KeyRule(_cfg("intermediate_size")),
    f"{A}.attention.head_count": KeyRule(_cfg("num_attention_heads")),
    f"{A}.attention.head_count_kv": KeyRule(_cfg("num_key_value_heads")),
    f"{A}.rope.scaling.finetuned": _LEFT_OUT,
    f"{A}.rope.scaling.original_context_length": KeyRule(_rope("original_max_position_embeddings")),
    f"{A}.rope.freq_base": KeyRule(_cfg("rope_theta")),
    f"{A}.rope.scaling.type": KeyRule(_const("yarn")),
    f"{A}.rope.scaling.factor": KeyRule(_rope("factor")),
    f"{A}.rope.scale_linear": _LEFT_OUT,  # the old name of rope.scaling.factor
    # llama-context.cpp derives YaRN's attention factor from the factor, as transformers does
    f"{A}.rope.scaling.attn_factor": KeyRule(None, lambda cfg, _tok: "attention_factor" not in (
        cfg.get("rope_scaling") or {})),
    f"{A}.rope.scaling.alpha": _LEFT_OUT,
    f"{A}.attention.key_length": KeyRule(_cfg("head_dim")),
    f"{A}.attention.value_length": KeyRule(_cfg("head_dim")),
    f"{A}.rope.dimension_count": _LEFT_OUT,  # defaults to key_length: the whole head rotates
    f"{A}.attention.key_length_swa": _LEFT_OUT, f"{A}.attention.value_length_swa": _LEFT_OUT,
    f"{A}.rope.dimension_count_swa": _LEFT_OUT,  # sliding layers have the same heads
    f"{A}.classifier.output_labels": _LEFT_OUT,
    # models/openai-moe.cpp load_arch_hparams
    f"{A}.attention.layer_norm_rms_epsilon": KeyRule(_cfg("rms_norm_eps")),
    f"{A}.expert_feed_forward_length": KeyRule(_cfg("intermediate_size")),
    f"{A}.attention.sliding_window": KeyRule(_cfg("sliding_window")),
    f"{A}.attention.sliding_window_pattern": KeyRule(None, _swa_pattern_fits),
    f"{A}.rope.freq_base_swa": _LEFT_OUT,  # defaults to rope.freq_base, as in the checkpoint
    # llama-vocab.cpp load
    "tokenizer.ggml.model": KeyRule(_const("gpt2")),
    "tokenizer.ggml.pre": KeyRule(_const("gpt-4o")),
    "tokenizer.ggml.token_type_count": _LEFT_OUT,
    "tokenizer.ggml.tokens": KeyRule(_const(ARRAY)),
    "tokenizer.ggml.scores": _LEFT_OUT,  # BPE ranks come from the merges
    "tokenizer.ggml.token_type": KeyRule(_const(ARRAY)),
    "tokenizer.ggml.merges": KeyRule(_const(ARRAY)),
    "tokenizer.ggml.add_space_prefix": _LEFT_OUT,  # BPE default false
    "tokenizer.ggml.remove_extra_whitespaces": _LEFT_OUT,
    "tokenizer.ggml.bos_token_id": KeyRule(_const(199998)),  # <|startoftext|>
    "tokenizer.ggml.eos_token_id": KeyRule(_const(200002)),  # <|return|>
    # found by text (<|end|>, then dropped from the EOG list next to <|return|>/<|call|>)
    "tokenizer.ggml.eot_token_id": _LEFT_OUT, "tokenizer.ggml.eom_token_id": _LEFT_OUT,
    "tokenizer.ggml.unknown_token_id": KeyRule(None, lambda _c, tok: not tok.get("unk_token")),
    "tokenizer.ggml.seperator_token_id": _LEFT_OUT,  # llama.cpp's spelling
    "tokenizer.ggml.padding_token_id": KeyRule(_const(199999)),  # <|endoftext|>
    "tokenizer.ggml.mask_token_id": _LEFT_OUT,
    "tokenizer.ggml.fim_pre_token_id": _LEFT_OUT, "tokenizer.ggml.fim_suf_token_id": _LEFT_OUT,
    "tokenizer.ggml.fim_mid_token_id": _LEFT_OUT, "tokenizer.ggml.fim_pad_token_id": _LEFT_OUT,
    "tokenizer.ggml.fim_rep_token_id": _LEFT_OUT, "tokenizer.ggml.fim_sep_token_id": _LEFT_OUT,
    "tokenizer.ggml.prefix_token_id": _LEFT_OUT, "tokenizer.ggml.suffix_token_id": _LEFT_OUT,
    "tokenizer.ggml.middle_token_id": _LEFT_OUT,
    "tokenizer.ggml.add_bos_token": KeyRule(lambda _c, tok: bool(tok.get("add_bos_token", False))),
    "tokenizer.ggml.add_eos_token": KeyRule(lambda _c, tok: bool(tok.get("add_eos_token", False))),
    "tokenizer.ggml.add_sep_token": _LEFT_OUT,  # BPE default false
    "tokenizer.ggml.normalizer.lowercase": _LEFT_OUT,
    "tokenizer.ggml.normalizer.strip_accents": _LEFT_OUT,
    "tokenizer.ggml.suppress_tokens": _LEFT_OUT,
    "tokenizer.ggml.precompiled_charsmap": _LEFT_OUT,
    f"{A}.vocab_size": _LEFT_OUT,  # read only for vocabulary-less models
}

# Keys we write that the vendored loader does not read: llama.cpp's own converter
# writes them too (the YaRN betas: llama.cpp uses its defaults 32 / 1, and the
# converter refuses a checkpoint with other values); the chat template is read
# when a prompt is rendered.
WRITTEN_BUT_NOT_READ: dict[str, Callable[[Config, Config], Any]] = {
    f"{A}.rope.scaling.yarn_beta_fast": lambda cfg, _tok: cfg["rope_scaling"].get("beta_fast"),
    f"{A}.rope.scaling.yarn_beta_slow": lambda cfg, _tok: cfg["rope_scaling"].get("beta_slow"),
    "tokenizer.chat_template": _const(PRESENT),
}
