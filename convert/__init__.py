"""Hugging Face gpt-oss checkpoint -> GGUF (Q8_0, Q4_K_M, BF16, F16, F32), streamed and atomic.

    python -m convert SRC -o OUT.gguf --type q8_0
    ggufllm convert SRC -o OUT.gguf --type q4_k_m
"""

from .converter import ARCHITECTURES, ConvertResult, convert, load_plan
from .fidelity import TensorReport, verify
from .quant import ExpertType, OutType

__all__ = ["convert", "load_plan", "verify", "ConvertResult", "TensorReport", "OutType",
           "ExpertType", "ARCHITECTURES"]
