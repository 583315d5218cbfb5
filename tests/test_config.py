import math

import pytest

from ggufllm import ConfigError, GenerationConfig, InvalidParameterError, load_settings


@pytest.mark.parametrize("name,value", [
    ("DEFAULT_TEMPERATURE", "nan"), ("DEFAULT_TEMPERATURE", "inf"), ("DEFAULT_TEMPERATURE", "-1"),
    ("DEFAULT_TOP_P", "0"), ("DEFAULT_TOP_P", "1.5"), ("DEFAULT_TOP_K", "-3"),
    ("DEFAULT_MAX_TOKENS", "0"), ("MAX_LENGTH", "abc"), ("N_GPU_LAYERS", "-5"),
    ("N_THREADS", "0"), ("LOAD_IN_8BIT", "maybe"), ("REASONING_EFFORT", "extreme"),
])
def test_bad_environment_value_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.field == name
    assert name in str(err.value)


def test_seed_environment_contract(monkeypatch):
    monkeypatch.setenv("LLM_MODEL_PATH", "/srv/models")
    monkeypatch.setenv("MAX_LENGTH", "8192")
    monkeypatch.setenv("USE_QUANTIZATION", "false")
    monkeypatch.setenv("LOAD_IN_4BIT", "true")
    monkeypatch.setenv("DEFAULT_MAX_TOKENS", "256")
    monkeypatch.setenv("DEFAULT_TEMPERATURE", "0.2")
    monkeypatch.setenv("DEFAULT_TOP_P", "0.5")
    monkeypatch.setenv("DEFAULT_TOP_K", "7")
    monkeypatch.setenv("N_GPU_LAYERS", "12")
    monkeypatch.setenv("N_THREADS", "2")
    s = load_settings()
    assert (s.llm_model_path, s.max_length, s.use_quantization, s.load_in_4bit) == (
        "/srv/models", 8192, False, True)
    g = s.generation()
    assert (g.max_tokens, g.temperature, g.top_p, g.top_k) == (256, 0.2, 0.5, 7)
    assert (s.n_gpu_layers, s.n_threads) == (12, 2)


@pytest.mark.parametrize("changes", [
    {"temperature": math.nan}, {"temperature": math.inf}, {"temperature": -0.1},
    {"max_tokens": 0}, {"max_tokens": -5}, {"top_p": 0.0}, {"top_p": 2.0}, {"top_k": -1},
    {"min_p": 1.5}, {"repeat_penalty": 0}, {"seed": -1}, {"reasoning_effort": "max"},
    {"no_such_key": 1}, {"max_tokens": "many"},
])
def test_bad_generation_parameter_is_rejected(changes):
    with pytest.raises(InvalidParameterError) as err:
        GenerationConfig().updated(**changes)
    assert err.value.name == next(iter(changes))


def test_updated_keeps_other_values():
    g = GenerationConfig(temperature=0.3).updated(top_k=3)
    assert (g.temperature, g.top_k) == (0.3, 3)
