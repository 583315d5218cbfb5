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


# Settings fields whose value is the default of a per-call generation parameter
TWINS = {"default_max_tokens": "max_tokens", "default_temperature": "temperature",
         "default_top_p": "top_p", "default_top_k": "top_k", "default_seed": "seed",
         "reasoning_effort": "reasoning_effort"}
PROBES = [-1, 0, 0.5, 1, 1.5, 10, 10.5, 100, 100.5, 1 << 20, (1 << 20) + 1, 2_000_000,
          0xFFFFFFFE, 0xFFFFFFFF, 1 << 32, "nan", "inf", "-inf", "7", "x", "low", "medium",
          "high", "extreme", True]


def test_every_setting_twin_has_the_type_and_bounds_of_its_generation_parameter():
    from ggufllm import Settings

    gen = GenerationConfig.model_fields
    found = {name: name.removeprefix("default_") for name in Settings.model_fields
             if name.removeprefix("default_") in gen}
    assert found == TWINS  # a new twin must join this sweep
    for name, twin in TWINS.items():
        setting, param = Settings.model_fields[name], gen[twin]
        assert (setting.annotation, setting.metadata) == (param.annotation, param.metadata), name
        assert Settings.model_fields[name].default == param.default, name


@pytest.mark.parametrize("name", list(TWINS))
def test_every_setting_twin_accepts_exactly_what_its_parameter_accepts(monkeypatch, name):
    twin = TWINS[name]
    for value in PROBES:
        monkeypatch.setenv(name.upper(), str(value))
        try:
            load_settings()
            setting_ok = True
        except ConfigError as err:
            assert err.field == name.upper()
            setting_ok = False
        try:
            GenerationConfig().updated(**{twin: str(value)})
            param_ok = True
        except InvalidParameterError:
            param_ok = False
        assert setting_ok == param_ok, (name, value)


def test_top_k_past_its_bound_is_a_config_error_not_a_pydantic_error(monkeypatch, default_gguf):
    from ggufllm import LLMService

    monkeypatch.setenv("DEFAULT_TOP_K", "2000000")
    with pytest.raises(ConfigError) as err:
        LLMService(default_gguf)
    assert err.value.field == "DEFAULT_TOP_K"


def test_llama_cpp_random_seed_value_is_refused(monkeypatch):
    # 0xFFFFFFFF is llama.cpp's "random" seed: accepting it would silently not reproduce
    with pytest.raises(InvalidParameterError) as err:
        GenerationConfig().updated(seed=0xFFFFFFFF)
    assert err.value.name == "seed"
    assert GenerationConfig().updated(seed=0xFFFFFFFE).seed == 0xFFFFFFFE
    monkeypatch.setenv("DEFAULT_SEED", "4294967295")
    with pytest.raises(ConfigError):
        load_settings()


def test_seed_none_returns_to_random_sampling(default_gguf):
    from ggufllm import LLMService

    svc = LLMService(default_gguf)  # nothing is loaded
    assert svc.update_generation_config(seed=7, top_k=3).seed == 7
    cfg = svc.update_generation_config(seed=None)
    assert (cfg.seed, cfg.top_k) == (None, 3)
    # None still means "not given" for parameters that have no None value
    assert GenerationConfig(max_tokens=9, seed=1).updated(max_tokens=None).max_tokens == 9
    svc.close()


def test_current_date_is_none_today_or_a_date(monkeypatch):
    assert load_settings().current_date == "none"  # as openai-harmony: no date line
    monkeypatch.setenv("CURRENT_DATE", " Today ")
    assert load_settings().current_date == "today"
    monkeypatch.setenv("CURRENT_DATE", "2026-02-28")
    assert load_settings().current_date == "2026-02-28"
    for bad in ("2026-02-30", "tomorrow", ""):
        monkeypatch.setenv("CURRENT_DATE", bad)
        with pytest.raises(ConfigError) as err:
            load_settings()
        assert err.value.field == "CURRENT_DATE"
