"""The README's Python, run as written; and the service contract it documents.

Every ```python block of README.md runs in its own interpreter, from an empty
folder (so the default model is the embedded one), with this checkout on the
path. A block with top-level ``await`` runs inside asyncio, as it would in a
notebook or an ``async def``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ggufllm import ConfigError, LLMService

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# Compiles the block with top-level await allowed; a block that awaits becomes
# a coroutine, which asyncio runs.
RUNNER = """\
import ast, asyncio, sys
source = open(sys.argv[1], encoding="utf-8").read()
code = compile(source, sys.argv[2], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
result = eval(code, {"__name__": "__main__"})
if asyncio.iscoroutine(result):
    asyncio.run(result)
"""


def readme_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every python block of README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_the_readme_has_python_blocks():
    blocks = readme_blocks()
    assert blocks, "README.md lost its Python examples"
    for line, code in blocks:  # each is valid Python (top-level await allowed)
        compile(code, f"README.md:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.parametrize("line,code", readme_blocks(),
                         ids=[f"line{line}" for line, _ in readme_blocks()])
def test_readme_block_runs(line: int, code: str, tmp_path: Path, default_gguf: Path):
    block = tmp_path / "block.py"
    block.write_text(code, encoding="utf-8")
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), DEFAULT_MAX_TOKENS="48")
    r = subprocess.run([sys.executable, str(runner), str(block), f"README.md:{line}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README.md block at line {line} failed:\n{r.stderr[-3000:]}"


# -- the service contract the README promises ------------------------------------------

def test_cleanup_then_load_model_loads_again(default_gguf: Path):
    import asyncio

    async def cycle() -> str:
        service = LLMService(default_gguf, max_length=512)
        await service.load_model()
        await service.cleanup()
        assert not service.is_loaded
        await service.load_model()
        try:
            return service.generate_answer("What is the capital of France?", temperature=0,
                                           max_tokens=8)
        finally:
            service.close()

    assert "Paris" in asyncio.run(cycle())


def test_unknown_setting_keyword_is_a_config_error(default_gguf: Path):
    with pytest.raises(ConfigError, match="n_paralel"):
        LLMService(default_gguf, n_paralel=8)
