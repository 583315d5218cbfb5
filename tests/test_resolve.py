from pathlib import Path

import pytest

from ggufllm import ModelNotFoundError
from ggufllm.resolve import pick_in_directory, quantization_of, resolve_model


@pytest.mark.parametrize("name,quant", [
    ("gpt-oss-20b-Q8_0.gguf", "Q8_0"), ("gpt-oss-20b-Q4_K_M.gguf", "Q4_K_M"),
    ("gemma-3-270m-q4_k_m.gguf", "Q4_K_M"), ("m.BF16.gguf", "BF16"), ("m-f16.gguf", "F16"),
    ("gpt-oss-20b-MXFP4.gguf", "MXFP4"), ("model.gguf", "unknown"), ("m-IQ4_XS.gguf", "IQ4_XS"),
])
def test_quantization_from_name(name, quant):
    assert quantization_of(Path(name)) == quant


def _folder(tmp_path: Path, *names: str) -> Path:
    for n in names:
        (tmp_path / n).write_bytes(b"")
    return tmp_path


def test_folder_preferences(tmp_path: Path):
    d = _folder(tmp_path, "m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-BF16.gguf")
    assert pick_in_directory(d).name == "m-Q8_0.gguf"
    assert pick_in_directory(d, load_in_4bit=True).name == "m-Q4_K_M.gguf"
    assert pick_in_directory(d, use_quantization=False).name == "m-BF16.gguf"


def test_empty_folder_gives_none(tmp_path: Path):
    assert pick_in_directory(tmp_path) is None


def test_explicit_missing_path_is_an_error(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match="convert"):
        resolve_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError):
        resolve_model(None, env_path=str(tmp_path / "elsewhere"))


def test_default_folder_falls_back_to_the_embedded_model(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING", logger="ggufllm"):
        r = resolve_model(None, env_path="models/llm")
    assert r.is_default and r.path.name == "gemma-3-270m-q4_k_m.gguf"
    assert len(caplog.records) == 1 and "convert" in caplog.records[0].getMessage()


def test_default_folder_with_a_model_wins(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "models" / "llm"
    d.mkdir(parents=True)
    (d / "x-Q8_0.gguf").write_bytes(b"")
    r = resolve_model(None, env_path="models/llm")
    assert not r.is_default and r.path.name == "x-Q8_0.gguf"
