"""ggufllm: gpt-oss-20b (and any GGUF model) offline through llama.cpp, for RAG answers.

    from ggufllm import llm_service
    await llm_service.load_model()
    print(llm_service.generate_answer("What is the capital of France?", context="..."))

``llm_service`` is created on first access (importing ggufllm loads nothing).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

# Offline always: the hub client must never reach the network from this package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A library never writes to an application's stderr on its own: without this
# handler, Python's last-resort handler would print ggufllm's (and llama.cpp's)
# warnings whenever the application has not configured logging. The CLI and
# applications that configure logging decide what to show.
logging.getLogger(__name__).addHandler(logging.NullHandler())

from .chunks import Answer, Chunk, Timings  # noqa: E402
from .config import GenerationConfig, Settings, load_settings  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    ContextLengthExceededError,
    ConversionError,
    DecodeFailedError,
    EngineError,
    EngineFailedError,
    GgufllmError,
    InvalidParameterError,
    KernelSelfTestError,
    KVCacheError,
    KVCacheMismatchError,
    KVCacheUntrustedError,
    LoadCancelledError,
    ModelLoadError,
    ModelNotFoundError,
    OutputExistsError,
    RequestRejectedError,
    ServerBusyError,
    ServiceClosedError,
)
from .harmony import Turn  # noqa: E402
from .service import LLMService  # noqa: E402

if TYPE_CHECKING:
    llm_service: LLMService

__version__ = "0.1.0"
__all__ = [
    "LLMService", "llm_service", "Answer", "Chunk", "Timings", "Turn",
    "GenerationConfig", "Settings", "load_settings",
    "GgufllmError", "ConfigError", "RequestRejectedError", "InvalidParameterError", "ModelNotFoundError",
    "ModelLoadError", "LoadCancelledError", "ContextLengthExceededError",
    "ServiceClosedError", "ConversionError", "OutputExistsError",
    "ServerBusyError", "KVCacheError", "KVCacheMismatchError", "KVCacheUntrustedError",
    "KernelSelfTestError",
    "EngineError", "DecodeFailedError", "EngineFailedError",
]

_service: LLMService | None = None
_service_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    # The shared service of the seed API, made on first use: importing the
    # package reads no environment and holds no native memory.
    global _service
    if name == "llm_service":
        if _service is None:
            with _service_lock:  # threads racing to the first use get one service, not two
                if _service is None:
                    _service = LLMService()
        return _service
    raise AttributeError(f"module 'ggufllm' has no attribute {name!r}")
