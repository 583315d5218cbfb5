"""The one error tree of ggufllm.

Every failure a user can cause or meet is one of these classes; the CLI and the
HTTP server translate :class:`GgufllmError` in one place each.

    GgufllmError
    ├── ConfigError                  a setting or environment variable is invalid
    │   └── KernelSelfTestError      CPU_EXTRA_BUFFERS=on, but those kernels failed their self-test
    ├── ModelNotFoundError           no GGUF file at the path (also FileNotFoundError)
    ├── ModelLoadError               the file is not a usable GGUF, or llama.cpp refused it
    │   └── LoadCancelledError       the load was cancelled by the caller
    ├── RequestRejectedError         a request refused before any decoding (the caller may retry it changed)
    │   ├── InvalidParameterError    a call argument is invalid (also a ValueError)
    │   │   └── UnsupportedSchemaError  a JSON Schema keyword the answer grammar cannot express
    │   ├── ContextLengthExceededError  prompt (+ budget) does not fit the context window
    │   └── ServerBusyError          every slot is busy and the wait queue is full
    ├── IncompleteAnswerError        a structured answer was cut by max_tokens (not valid JSON)
    ├── KVCacheError                 a saved KV-cache file is unreadable (truncated, garbage)
    │   ├── KVCacheMismatchError     the file is from another model, build, setting or format
    │   └── KVCacheUntrustedError    the file was not signed with this user's key (trusted=True)
    ├── ServiceClosedError           the service was cleaned up / closed
    ├── EngineError                  the engine failed while it ran a request
    │   ├── DecodeFailedError        llama_decode failed for the requests of one batch
    │   └── EngineFailedError        the scheduler stopped on an error (the model reloads)
    └── ConversionError              the converter found problems (lists them all)
        └── OutputExistsError        the output exists and --force was not given
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "GgufllmError",
    "ConfigError",
    "KernelSelfTestError",
    "RequestRejectedError",
    "InvalidParameterError",
    "UnsupportedSchemaError",
    "ModelNotFoundError",
    "ModelLoadError",
    "LoadCancelledError",
    "ContextLengthExceededError",
    "ServerBusyError",
    "IncompleteAnswerError",
    "KVCacheError",
    "KVCacheMismatchError",
    "KVCacheUntrustedError",
    "ServiceClosedError",
    "EngineError",
    "DecodeFailedError",
    "EngineFailedError",
    "ConversionError",
    "OutputExistsError",
]

CONVERT_HINT = (
    "convert the Hugging Face gpt-oss-20b folder with "
    "`ggufllm convert PATH/TO/gpt-oss-20b -o models/llm/gpt-oss-20b-Q8_0.gguf`"
)


class GgufllmError(Exception):
    """Root of every error ggufllm raises on purpose."""


class ConfigError(GgufllmError, ValueError):
    """A setting (environment variable or config field) is invalid.

    Attributes:
        field: the setting's name as the user wrote it (e.g. ``DEFAULT_TEMPERATURE``).
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class KernelSelfTestError(ConfigError):
    """``CPU_EXTRA_BUFFERS=on`` asked for llama.cpp's extra buffer types (repacked
    layouts, AMX), but a child process decoding with them on this CPU failed.

    Attributes:
        reason: how the test failed (the signal, non-finite logits, a hang).
        weight_types: the weight types that were tested.
    """

    def __init__(self, reason: str, weight_types: Sequence[str]) -> None:
        super().__init__(
            f"CPU_EXTRA_BUFFERS=on: llama.cpp's repacked CPU kernels for {', '.join(weight_types)} "
            f"failed a self-test on this CPU ({reason}); use CPU_EXTRA_BUFFERS=auto (loads "
            "without them) or CPU_EXTRA_BUFFERS=force to use them anyway",
            "CPU_EXTRA_BUFFERS")
        self.reason = reason
        self.weight_types = tuple(weight_types)


class RequestRejectedError(GgufllmError):
    """A request refused before any decoding: nothing ran, nothing is lost (the server
    answers 4xx). Its subclasses say why; :class:`EngineError` is the other side, a
    request that failed while it ran."""


class InvalidParameterError(RequestRejectedError, ValueError):
    """A call argument is invalid; raised before anything reaches llama.cpp.

    Attributes:
        name: the parameter's name.
    """

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class UnsupportedSchemaError(InvalidParameterError):
    """A JSON Schema for a structured answer uses what its grammar cannot express; it is
    refused rather than ignored, so that an answer never passes for valid when it is not.

    Attributes:
        keyword: the JSON Schema keyword (``minimum``, ``format``, ``oneOf``...).
        path: where it is in the schema, as a JSON pointer (``/properties/age``).
        reason: why it is refused (may be empty).
    """

    def __init__(self, keyword: str, path: str, reason: str = "",
                 param: str = "response_format") -> None:
        where = path or "/"
        detail = f": {reason}" if reason else ""
        super().__init__(f"{param}: the JSON Schema keyword {keyword!r} at {where} is "
                         f"not supported{detail}", param)
        self.keyword = keyword
        self.path = path
        self.reason = reason


class ModelNotFoundError(GgufllmError, FileNotFoundError):
    """No GGUF model at the given path."""

    def __init__(self, path: str) -> None:
        super().__init__(f"no GGUF model found at {path!r}; {CONVERT_HINT}")
        self.path = path


class ModelLoadError(GgufllmError):
    """The file is not a usable GGUF model (checked before llama.cpp opens it),
    or llama.cpp refused it.

    Attributes:
        path: the file.
        problems: every problem found by the pre-load check.
    """

    def __init__(self, path: str, problems: Sequence[str]) -> None:
        detail = "; ".join(problems) if problems else "llama.cpp could not load it"
        super().__init__(f"cannot load {path!r}: {detail}")
        self.path = path
        self.problems = list(problems)


class LoadCancelledError(ModelLoadError):
    """The caller cancelled the load (progress callback returned False or cancel())."""

    def __init__(self, path: str) -> None:
        super().__init__(path, ["load cancelled"])


class ContextLengthExceededError(RequestRejectedError):
    """The prompt plus the requested budget does not fit the context window.

    Attributes:
        n_prompt: tokens in the prompt.
        n_ctx: the context window in tokens.
        max_tokens: the generation budget that was asked for.
    """

    def __init__(self, n_prompt: int, n_ctx: int, max_tokens: int = 0) -> None:
        super().__init__(
            f"prompt of {n_prompt} tokens plus max_tokens={max_tokens} exceeds "
            f"the context window of {n_ctx} tokens"
        )
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx
        self.max_tokens = max_tokens


class ServerBusyError(RequestRejectedError):
    """Every slot is busy and the bounded wait queue is full; retry later.

    Attributes:
        queue_size: the queue's capacity (``MAX_QUEUE``).
    """

    def __init__(self, queue_size: int) -> None:
        super().__init__(f"busy: all slots are in use and the wait queue ({queue_size}) is full; "
                         "retry later")
        self.queue_size = queue_size


class IncompleteAnswerError(GgufllmError):
    """A structured answer ended before its JSON was complete (``max_tokens`` ran out), so it
    cannot be parsed; raise ``max_tokens`` (or lower ``reasoning_budget``).

    Attributes:
        text: what was written of the answer.
        finish_reason: how generation ended (``length``, ``cancelled``...).
    """

    def __init__(self, text: str, finish_reason: str | None) -> None:
        super().__init__(f"the structured answer is incomplete (finish_reason={finish_reason!r}, "
                         f"{len(text)} characters written): raise max_tokens")
        self.text = text
        self.finish_reason = finish_reason


class KVCacheError(GgufllmError):
    """A saved KV-cache file cannot be read (truncated, garbage, wrong format).

    Attributes:
        path: the file.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot use KV-cache file {path!r}: {reason}")
        self.path = path
        self.reason = reason


class KVCacheMismatchError(KVCacheError):
    """A saved KV-cache file was made by another model, llama.cpp build, context setting
    or file format."""


class KVCacheUntrustedError(KVCacheError):
    """A saved KV-cache file was not signed with this user's key: another machine or
    account wrote it, or it was changed since. Its tokens would be taken to match its
    KV state unchecked, so it is used only when the caller trusts it
    (``load_kv_cache(path, trusted=True)``).

    Attributes:
        key_path: the key the file was checked against.
    """

    def __init__(self, path: str, key_path: str) -> None:
        super().__init__(path, f"it was not written by ggufllm under this user's key "
                               f"({key_path}): another machine or account wrote it, or it was "
                               "changed since. Load it only if you trust where it came from: "
                               "LLMService.load_kv_cache(path, trusted=True)")
        self.key_path = key_path


class ServiceClosedError(GgufllmError):
    """The service (or engine) was closed; create a new one."""


class EngineError(GgufllmError):
    """The engine failed while it ran a request: the request was not answered (a server
    answers 5xx or ends the stream with an error event, never as a whole answer)."""


class DecodeFailedError(EngineError):
    """``llama_decode`` failed for the batch this request was in.

    Attributes:
        code: llama_decode's return code (1: no free KV cells; < 0: an error).
    """

    def __init__(self, code: int) -> None:
        what = " (no free KV cells)" if code == 1 else ""
        super().__init__(f"llama_decode failed with code {code}{what}")
        self.code = code


class EngineFailedError(EngineError):
    """The scheduler thread stopped on an unexpected error; every request it held ends
    with this error and the service reloads the model (a bounded number of times).

    Attributes:
        reason: the error that stopped it, as ``Type: message``.
    """

    def __init__(self, reason: str, detail: str = "the model is reloaded") -> None:
        super().__init__(f"the engine stopped on an error ({reason}); {detail}")
        self.reason = reason


class ConversionError(GgufllmError):
    """The converter found one or more problems; ``problems`` lists them all."""

    def __init__(self, problems: Sequence[str] | str) -> None:
        items = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in items)
        super().__init__(f"{len(items)} problem(s):\n{lines}")
        self.problems = items


class OutputExistsError(ConversionError):
    """The output file exists and ``force`` was not given."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} exists; pass --force to overwrite it")
        self.path = path
