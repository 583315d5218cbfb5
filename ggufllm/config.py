"""Validated configuration: environment settings and per-call generation parameters.

The environment variables are those of the service ggufllm replaces
(``LLM_MODEL_PATH``, ``MAX_LENGTH``, ``DEFAULT_TEMPERATURE``, ...) plus the
llama.cpp ones (``N_GPU_LAYERS``, ``N_THREADS``, ...). Every value is checked;
a bad one raises :class:`~ggufllm.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import datetime as _dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError, InvalidParameterError
from .structured import ResponseFormat
from .structured.tools import FunctionTool, ToolChoice

__all__ = ["Settings", "GenerationConfig", "ReasoningEffort", "load_settings"]

ReasoningEffort = Literal["low", "medium", "high"]
# what to do when a prompt plus its budget does not fit the context window
OverflowPolicy = Literal["error", "truncate_context", "shrink_max_tokens", "drop_oldest_turns"]
KVCacheType = Literal["f16", "q8_0", "q4_0"]
# llama.cpp's extra CPU buffer types (repacked layouts, AMX): see ggufllm.native.kernels
ExtraBuffersMode = Literal["auto", "on", "off", "force"]
# how cached KV cells are reused: fast = any prefix whose tokens match (as llama-server);
# exact = only what gives bit-identical logits to a cold run (see engine/kvcache.py)
KVReuse = Literal["fast", "exact"]
DEFAULT_MODEL_DIR = "models/llm"

# llama.cpp reads the seed 0xFFFFFFFF (LLAMA_DEFAULT_SEED) as "pick a random seed":
# it is refused, so that a seed given always reproduces; None asks for random.
MAX_SEED = 0xFFFFFFFE

# The bounds of each generation parameter, shared by the per-call field and its
# DEFAULT_* setting so that the two can never disagree.
MaxTokens = Annotated[int, Field(ge=1, le=1 << 20)]
Temperature = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0, le=1 << 20)]
MinP = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
RepeatPenalty = Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)]
Seed = Annotated[int | None, Field(ge=0, le=MAX_SEED)]


class GenerationConfig(BaseModel):
    """Sampling parameters of one call. Unknown keys and non-finite floats are rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              frozen=True)

    max_tokens: MaxTokens = Field(1000, description="most tokens to generate")
    temperature: Temperature = Field(0.7, description="0 means greedy")
    top_p: TopP = Field(0.9, description="nucleus sampling mass")
    top_k: TopK = Field(50, description="0 disables top-k")
    min_p: MinP = Field(0.0, description="min-p sampling; 0 disables")
    repeat_penalty: RepeatPenalty = Field(1.0, description="1 disables")
    seed: Seed = Field(None, description=f"0..{MAX_SEED} reproduces a sampled answer; "
                       "None: random")
    reasoning_effort: ReasoningEffort = Field("low", description="gpt-oss reasoning level")
    stop: tuple[str, ...] = Field((), description="extra stop strings")
    overflow: OverflowPolicy = Field("error", description="a prompt that does not fit: raise "
                                     "(error), trim the RAG context, lower max_tokens, or drop "
                                     "the oldest chat turns")
    response_format: ResponseFormat | None = Field(
        None, description="a structured answer: JSON that matches a schema (see "
        "ggufllm.structured.ResponseFormat.of); None: free text")
    reasoning_budget: int | None = Field(
        None, ge=0, le=1 << 20, description="gpt-oss with a response_format: the most analysis "
        "tokens before the answer is forced (None: as many as max_tokens leaves room for)")
    tools: tuple[FunctionTool, ...] = Field(
        (), description="functions the reply may call (see ggufllm.structured.tools)")
    tool_choice: ToolChoice = Field(
        "auto", description="auto: the model decides; none: no call (the tools are not shown); "
        "required: it calls one of them; a ForcedFunction: it calls that one")

    def updated(self, **changes: Any) -> GenerationConfig:
        """Returns a copy with ``changes`` applied and validated.

        None leaves a parameter as it is (``max_tokens=None`` means "not given"),
        except where None is a value of its own: ``seed=None`` returns to random
        sampling.

        Raises:
            InvalidParameterError: an unknown key or an invalid value.
        """
        changes = {k: v for k, v in changes.items() if v is not None or k in _NULLABLE}
        try:
            return GenerationConfig.model_validate({**self.model_dump(), **changes})
        except ValidationError as exc:
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else None
            raise InvalidParameterError(f"{name}: {err['msg']} (got {err.get('input')!r})",
                                        name) from None


# parameters for which None is a value (not "leave as it is")
_NULLABLE = frozenset({"seed"})


class Settings(BaseSettings):
    """Service settings, read from the environment (names are upper-case, no prefix)."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False,
                                      validate_default=True)

    llm_model_path: str = Field(DEFAULT_MODEL_DIR, description="a .gguf file or a folder of them")
    max_length: int = Field(4096, ge=64, le=1 << 20, description="context window (n_ctx)")
    use_quantization: bool = Field(True, description="prefer a quantized file in the folder")
    load_in_8bit: bool = Field(True, description="prefer the Q8_0 file")
    load_in_4bit: bool = Field(False, description="prefer the Q4_K_M file")
    default_max_tokens: MaxTokens = 1000
    default_temperature: Temperature = 0.7
    default_top_p: TopP = 0.9
    default_top_k: TopK = 50
    default_seed: Seed = None
    reasoning_effort: ReasoningEffort = "low"
    current_date: str = Field("none", description="the date in gpt-oss's system message: none "
                              "(no date line, as openai-harmony; cached prompts stay valid "
                              "across days), today, or YYYY-MM-DD")
    n_gpu_layers: Annotated[int, Field(ge=-1)] | Literal["auto"] = Field(
        "auto", description="layers to offload; -1 = all; auto = what fits the GPU (0 without one)")
    n_threads: int | None = Field(None, ge=1, le=1024)
    n_batch: int = Field(512, ge=1, le=1 << 16)
    flash_attn: bool | None = Field(None, description="None: llama.cpp decides")
    cpu_extra_buffers: ExtraBuffersMode = Field(
        "auto", description="llama.cpp's repacked/AMX CPU weight layouts: auto = use them where "
        "a self-test decode in a child process passes; on = use them, error if the test fails; "
        "off = never; force = use them untested")
    # engine: concurrency and KV cache
    n_parallel: int = Field(4, ge=1, le=256, description="sequences decoded together (slots)")
    max_queue: int = Field(64, ge=0, le=1 << 16,
                           description="requests waiting for a slot before ServerBusyError")
    kv_cache_type: KVCacheType = Field("f16", description="type of the K and V cache")
    kv_cache_tokens: int | None = Field(None, ge=64, le=1 << 24,
                                        description="KV pool size; None: MAX_LENGTH x N_PARALLEL")
    kv_cache_ram_mb: int = Field(1024, ge=0, le=1 << 22,
                                 description="host RAM for evicted prefixes (0 disables)")
    swa_full: bool = Field(True, description="full-size sliding-window cache (prefixes reusable)")
    kv_reuse: KVReuse = Field("fast", description="fast: reuse and restore any cached prefix "
                              "whose tokens match (an answer may leave the cold one at a near "
                              "tie); exact: only prefixes that give a cold run's very logits")
    # GPU placement of MoE experts
    cpu_moe: bool = Field(False, description="keep every MoE expert tensor in CPU memory")
    n_cpu_moe: int = Field(0, ge=0, le=512,
                           description="keep the expert tensors of the first N layers on the CPU")

    @field_validator("current_date")
    @classmethod
    def _date_or_word(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("none", "today"):
            try:
                _dt.date.fromisoformat(value)
            except ValueError:
                raise ValueError("must be none, today or a date as YYYY-MM-DD") from None
        return value

    def generation(self) -> GenerationConfig:
        """The default generation parameters these settings describe."""
        return GenerationConfig(
            max_tokens=self.default_max_tokens, temperature=self.default_temperature,
            top_p=self.default_top_p, top_k=self.default_top_k, seed=self.default_seed,
            reasoning_effort=self.reasoning_effort,
        )


def load_settings(**overrides: Any) -> Settings:
    """Reads :class:`Settings` from the environment, with ``overrides`` on top.

    Raises:
        ConfigError: a value is invalid; the message names the variable.
    """
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = []
        field = None
        for err in exc.errors():
            field = str(err["loc"][0]).upper() if err["loc"] else None
            problems.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid setting: " + "; ".join(problems), field) from None
