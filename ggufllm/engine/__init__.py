"""The llama.cpp engine: native handle owners, prompt formats and the decode loop."""

from .engine import Engine, EngineOptions
from .prompt import Prompt, PromptBuilder, PromptKind

__all__ = ["Engine", "EngineOptions", "Prompt", "PromptBuilder", "PromptKind"]
