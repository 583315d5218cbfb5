"""gpt-oss's harmony format: prompt rendering and the streaming channel parser."""

from .parser import Delta, HarmonyParser, HarmonyTokens
from .render import DEFAULT_INSTRUCTIONS, Segment, Turn, rag_user_message, render_conversation

__all__ = ["Delta", "HarmonyParser", "HarmonyTokens", "Segment", "Turn",
           "DEFAULT_INSTRUCTIONS", "rag_user_message", "render_conversation"]
