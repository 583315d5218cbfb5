"""The README and docs/ as written: their Python runs, their links resolve, the README stays short.

Every ```python block of README.md and docs/*.md runs in its own interpreter, from
an empty folder (so the default model is the embedded one), with this checkout on
the path. A block with top-level ``await`` runs inside asyncio, as it would in a
notebook or an ``async def``. Every relative link and image of those files names a
file of this repository (and a heading of it when it has ``#anchor``), and nothing
in them or in benchmarks/ names a path of the machine they were written on.
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
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target), with an optional "title"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
README_MAX_LINES = 250
# The Quickstart's test command, which .ci/run runs as written
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest"

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


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def python_blocks() -> list[tuple[str, int, str]]:
    """(file, line number, code) of every python block of README.md and docs/*.md."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        found += [(_name(page), text.count("\n", 0, m.start()) + 1, m.group(1))
                  for m in BLOCK.finditer(text)]
    return found


def _prose(text: str) -> str:
    """The text without fenced blocks and code spans, where a link is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes for ``page``: lower case, punctuation dropped,
    spaces as hyphens, ``-1``, ``-2``... after a repeated one."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for title in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(f"{slug}-{n}" if n else slug)
    return found


def test_the_readme_has_python_blocks():
    blocks = python_blocks()
    assert any(name == "README.md" for name, _, _ in blocks), "README.md lost its Python examples"
    for name, line, code in blocks:  # each is valid Python (top-level await allowed)
        compile(code, f"{name}:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


# README's OpenAI block starts a server on a set port: it runs once, on a free port and with its
# output checked, in tests/test_server_lifecycle.py::test_readme_openai_example_runs
RUN_HERE = [(name, line, code) for name, line, code in python_blocks()
            if not (name == "README.md" and "OpenAI(" in code)]


@pytest.mark.parametrize("name,line,code", RUN_HERE,
                         ids=[f"{name}:{line}" for name, line, _ in RUN_HERE])
def test_doc_block_runs(name: str, line: int, code: str, tmp_path: Path, default_gguf: Path):
    block = tmp_path / "block.py"
    block.write_text(code, encoding="utf-8")
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), DEFAULT_MAX_TOKENS="48")
    r = subprocess.run([sys.executable, str(runner), str(block), f"{name}:{line}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{name} block at line {line} failed:\n{r.stderr[-3000:]}"


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.is_relative_to(ROOT) or not dest.exists():
                broken.append(f"{_name(page)}: {target} (no such file in the repository)")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                broken.append(f"{_name(page)}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


def test_the_anchors_are_githubs():
    page = ROOT / "docs" / "measured.md"
    assert "decode-speed-python-benchmarksdecode_speedpy---rounds-9---tokens-192" in anchors(page)
    assert "shutdown-slow-clients-and-shared-keys" in anchors(ROOT / "docs" / "server.md")


def test_the_readme_is_a_short_tour():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/"


def test_ci_runs_the_quickstart_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert f"```bash\n{TEST_COMMAND}\n```" in quickstart
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_no_file_names_a_path_of_this_machine():
    files = [*PAGES, *(ROOT / "docs").rglob("*"), *(ROOT / "benchmarks").rglob("*")]
    named = []
    for path in sorted(set(files)):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # docs/page.png
            continue
        named += [f"{_name(path)}:{n}: {line.strip()}"
                  for n, line in enumerate(text.splitlines(), 1) if "/work/" in line]
    assert not named, "\n".join(named)


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
