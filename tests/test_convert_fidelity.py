"""The converter's fidelity against llama.cpp: the metadata keys its loaders read, the
Q4_K_M recipe on the real depth, the row-chunked encoder, and ``verify``'s error bounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from convert import convert, load_plan, verify
from ggufllm import ConversionError
from ggufllm.gguf_file import read_gguf_header

from .gpt_oss_fixture import REAL_DEPTH_CONFIG, small_vocab_config, write_checkpoint
from .test_convert import _copy, _llama_quantize, tensors

pytestmark = pytest.mark.slow  # converts tiny models, one with the real depth


def test_every_key_llama_cpp_reads_is_written_or_rightly_left_out(tiny_gguf, tiny_checkpoint):
    """Our metadata against the table of every key llama.cpp's gpt-oss and vocab loaders read."""
    from convert.llama_keys import ARRAY, GPT_OSS_KEYS, PRESENT, WRITTEN_BUT_NOT_READ

    r = read_gguf_header(tiny_gguf("q8_0"), probe=False)
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    tok = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    ours = {**r.metadata, **{k: ARRAY for k in r.array_lengths}}
    expected = {k: rule.value for k, rule in GPT_OSS_KEYS.items() if rule.value is not None}
    expected |= WRITTEN_BUT_NOT_READ
    for key, value in expected.items():
        want = value(cfg, tok)
        assert key in ours, f"llama.cpp reads {key}: not written"
        if want is not PRESENT:
            got = ours[key]
            assert got == (want if want is ARRAY or isinstance(want, (bool, str))
                           else pytest.approx(want, rel=1e-6)), key
    for key, rule in GPT_OSS_KEYS.items():
        if rule.value is None:
            assert key not in ours and rule.default_fits(cfg, tok), key
    written = {k for k in ours if k.startswith(("gpt-oss.", "tokenizer."))}
    assert written <= expected.keys(), written - expected.keys()


@pytest.fixture(scope="module")
def real_depth_checkpoint(tmp_path_factory, small_vocab_tokenizer) -> Path:
    """The real depth and K-quant rows; SMALL_VOCAB tokens (the recipe does not depend
    on the vocabulary's size)."""
    return write_checkpoint(tmp_path_factory.mktemp("gpt-oss-24"), small_vocab_tokenizer,
                            config=small_vocab_config(REAL_DEPTH_CONFIG), seed=1)


def _counting_encode(monkeypatch, chunk_elements: int) -> dict[tuple[int, ...], int]:
    """Encodes matrices of more than ``chunk_elements`` a slice of rows at a time; returns
    the count of encode calls per shape, filled as the converter runs."""
    from convert import quant

    calls: dict[tuple[int, ...], int] = {}
    encode = quant.encode

    def counting(values: np.ndarray, qtype: Q) -> np.ndarray:
        calls[values.shape] = calls.get(values.shape, 0) + 1
        return encode(values, qtype)

    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(quant, "encode", counting)
    return calls


def test_q4_k_m_recipe_on_24_layers_equals_llama_cpp_quantizer(real_depth_checkpoint, tmp_path,
                                                              monkeypatch):
    """The per-layer Q4_K_M choice (more bits in the first/last eighth and every third
    layer) and real K-quant blocks, byte for byte against llama_model_quantize; the
    embedding and output matrices go through the row-chunked encoder, as at full size."""
    bf16 = convert(real_depth_checkpoint, tmp_path / "bf16.gguf", "bf16").path
    calls = _counting_encode(monkeypatch, 1000 * 256)  # 4096 rows: 4 chunks of 1000, 96 left
    ours = tensors(convert(real_depth_checkpoint, tmp_path / "q4km.gguf", "q4_k_m").path)
    assert calls[(1000, 256)] == 2 * 4 and calls[(96, 256)] == 2
    reference = tmp_path / "llama-quantize.gguf"
    _llama_quantize(bf16, reference, 15)
    theirs = tensors(reference)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name][0] == theirs[name][0], name
        assert ours[name][1] == theirs[name][1], name
    v_types = [ours[f"blk.{i}.attn_v.weight"][0] for i in range(24)]
    # layers 0-2, 21-23 and every third between (5, 8, ..., 20) get more bits
    assert [i for i, t in enumerate(v_types) if t is Q.Q6_K] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]
    assert v_types.count(Q.Q4_K) == 12
    assert ours["output.weight"][0] is Q.Q6_K and ours["blk.5.attn_q.weight"][0] is Q.Q4_K


def test_row_chunked_encoder_equals_llama_cpp_quantizer(small_checkpoint, small_gguf, tmp_path,
                                                        monkeypatch):
    """The chunked path (large matrices encoded a slice of rows at a time) writes the same
    bytes as the one-shot path and as llama.cpp's quantizer."""
    one_shot = tensors(small_gguf("q8_0"))
    reference = tmp_path / "llama-quantize.gguf"
    _llama_quantize(small_gguf("bf16"), reference, 7)
    # the 4096-row embedding / lm_head in chunks of 1001 rows: 5 chunks, the last partial
    calls = _counting_encode(monkeypatch, 1001 * 64)
    chunked = tensors(convert(small_checkpoint, tmp_path / "chunked.gguf", "q8_0").path)
    assert calls[(1001, 64)] == 2 * 4 and calls[(92, 64)] == 2  # both big matrices
    assert chunked == tensors(reference) == one_shot


def _verify_cli(gguf_path: Path, reference: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ggufllm.cli", "verify", str(gguf_path),
                           "--reference", str(reference), "--json"],
                          capture_output=True, text=True, timeout=300)


CORRUPTED = ["blk.0.attn_norm.weight", "blk.1.attn_q.weight", "output.weight"]


def test_verify_exits_1_on_each_corrupted_tensor(small_gguf, small_checkpoint, tmp_path):
    """Q8_0 / F32 tensors are held to their type's error bound, not only MXFP4 to its codes:
    one Q8_0 and one F32 tensor of a layer and the output, each corrupted in one place (one
    file and one run for all three: each tensor is checked on its own), are each reported,
    and nothing else is."""
    good = small_gguf("q8_0")
    r = _verify_cli(good, small_checkpoint)
    assert r.returncode == 0, r.stderr
    data = bytearray(good.read_bytes())
    for info in read_gguf_header(good, probe=False).tensors:
        if info.name in CORRUPTED:
            at = info.offset + info.n_bytes // 2
            data[at:at + 68] = bytes(b ^ 0x5A for b in data[at:at + 68])  # 2 Q8_0 blocks, 17 floats
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    r = _verify_cli(bad, small_checkpoint)
    assert r.returncode == 1 and f"{len(CORRUPTED)} tensor(s) differ" in r.stderr
    failed = [json.loads(line) for line in r.stdout.splitlines()]
    failed = [f for f in failed if not f["rel_error"] <= f["bound"]]
    assert sorted(f["name"] for f in failed) == CORRUPTED


@pytest.fixture(scope="module")
def reports(tiny_gguf, tiny_checkpoint):
    """reports(type) -> verify's report of the tiny checkpoint's file of that type (once)."""
    made: dict[str, list] = {}

    def get(out_type: str) -> list:
        if out_type not in made:
            made[out_type] = list(verify(tiny_gguf(out_type), tiny_checkpoint))
        return made[out_type]

    return get


def test_verify_reports_fidelity(reports):
    q8 = {r.name: r for r in reports("q8_0")}
    assert all(r.ok for r in q8.values())
    assert q8["blk.0.ffn_gate_exps.weight"].bit_exact is True
    assert q8["blk.0.attn_norm.weight"].rel_error == 0.0
    assert 0 < q8["blk.0.attn_q.weight"].rel_error < 1e-2
    assert max(r.rel_error for r in reports("f32")) == 0.0
    q4 = {r.name: r for r in reports("q4_k_m")}
    assert q4["blk.0.attn_output.weight"].qtype == "Q4_K"
    assert q4["blk.0.attn_output.weight"].rel_error < 0.1


def test_error_bounds_hold_on_every_type_with_a_margin(reports):
    """Each type's worst tensor sits between a fifth and the whole of its bound."""
    worst: dict[str, float] = {}
    for out_type in ("q8_0", "q4_k_m"):
        for r in reports(out_type):
            assert r.ok, r
            worst[r.qtype] = max(worst.get(r.qtype, 0.0), r.rel_error / r.bound if r.bound else 0)
    assert {k: v > 0.2 for k, v in worst.items() if k not in ("F32", "MXFP4")} == \
        {"Q8_0": True, "Q4_K": True, "Q5_0": True}


def test_yarn_betas_llama_cpp_would_ignore_are_refused(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg["rope_scaling"] |= {"beta_fast": 16.0, "beta_slow": 2.0}
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError) as err:
        load_plan(d)
    text = "\n".join(err.value.problems)
    assert "beta_fast = 16.0" in text and "beta_slow = 2.0" in text
