"""What the validity benchmarks share: the tiny gpt-oss fixture, and a format checker."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema

# RFC 3339 full-time and date-time (jsonschema checks these only with the optional
# rfc3339-validator package; its bare FormatChecker falls back to draft 3's "HH:MM:SS")
_TIME = re.compile(r"([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)")


def format_checker() -> jsonschema.FormatChecker:
    """Draft 2020-12's format checks, with ``time`` and ``date-time`` as RFC 3339 has them."""
    checker = jsonschema.FormatChecker()
    checker.checkers = dict(jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers)

    @checker.checks("time")
    def _time(value: object) -> bool:
        return not isinstance(value, str) or bool(_TIME.fullmatch(value))

    @checker.checks("date-time")
    def _date_time(value: object) -> bool:
        if not isinstance(value, str) or "T" not in value.upper():
            return not isinstance(value, str)
        day, _, time = value.upper().partition("T")
        return checker.conforms(day, "date") and _time(time)

    return checker


def tiny_model(folder: Path) -> Path:
    """The tiny gpt-oss fixture (random weights, the real o200k_harmony tokenizer), converted."""
    from convert import convert
    from tests.gpt_oss_fixture import write_checkpoint

    return convert(write_checkpoint(folder / "src"), folder / "tiny-q8_0.gguf", "q8_0",
                   "mxfp4").path

