"""Every crafted or truncated GGUF gives ModelLoadError, and the process lives on."""

from __future__ import annotations

from pathlib import Path

import pytest

from ggufllm import LLMService, ModelLoadError
from ggufllm.gguf_file import read_gguf_header

from .gguf_corpus import corpus, valid_spec

CORPUS = corpus()


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 20


def test_valid_file_passes(tmp_path: Path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(valid_spec().build())
    s = read_gguf_header(p)
    assert [t.name for t in s.tensors] == ["a.weight", "b.weight"]
    assert s.tensors[1].n_bytes == 68 and s.architecture == "llama"
    assert s.array_lengths["tokenizer.ggml.tokens"] == 2 and s.context_length == 64


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_crafted_file_is_refused_with_a_reason(tmp_path: Path, name: str):
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(CORPUS[name])
    with pytest.raises(ModelLoadError) as err:
        read_gguf_header(p)
    assert err.value.problems and err.value.path == str(p)


@pytest.mark.parametrize("name", ["truncated_in_data", "huge_tensor_count", "data_past_end",
                                  "unknown_type_id", "bad_magic"])
def test_service_refuses_crafted_file_and_stays_usable(tmp_path: Path, name: str, default_gguf):
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(CORPUS[name])
    svc = LLMService(p)
    with pytest.raises(ModelLoadError):
        svc.load()
    assert not svc.is_loaded
    with LLMService(default_gguf, max_length=256) as ok:
        assert ok.generate_answer("What is 2+2?", max_tokens=4, temperature=0)


def test_header_valid_but_not_a_model_is_refused_by_llama_cpp(tmp_path: Path):
    p = tmp_path / "not_a_model.gguf"
    p.write_bytes(valid_spec().build())
    with pytest.raises(ModelLoadError, match="llama.cpp refused"):
        LLMService(p).load()


@pytest.mark.parametrize("fraction", [0.0001, 0.01, 0.3, 0.999])
def test_truncated_real_model_is_refused(tmp_path: Path, default_gguf: Path, fraction: float):
    data = default_gguf.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError):
        LLMService(p).load()


def test_real_model_header_summary(default_gguf: Path):
    s = read_gguf_header(default_gguf)
    assert s.architecture == "gemma3" and s.context_length == 32768
    assert 2.6e8 < s.n_params < 2.8e8
    assert {t for t, _, _ in s.type_table()} >= {"Q8_0", "Q4_K", "F32"}
