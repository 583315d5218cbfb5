"""``ggufllm ask --tools``: tool calls from the shell, on the tiny gpt-oss.

The tiny gpt-oss has random weights: a call is certain only when it is forced (``--tool-choice
required`` or a function's name), and a forced choice holds for every reply, so a loop that runs
the calls ends at ``--max-tool-rounds``. A reply that calls nothing, ending the loop, is
scripted (:class:`ScriptedService`); a run with ``auto`` is checked for what holds whichever
way the model goes. The flags that cannot work fail before any model loads (``-m`` names no file:
a later check would report that instead).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggufllm.chunks import Chunk, ToolCall, ToolCallDelta
from ggufllm.cli import cli
from ggufllm.cli.common import CliError
from ggufllm.cli.toolexec import run_tool
from ggufllm.cli.tools import Echo, ToolSetup, converse, read_tools
from ggufllm.harmony import Turn
from ggufllm.structured.tools import tool_choice_of

from .test_cli import ggufllm
from .test_tools import get_weather, search

BY_NAME = {f.__name__: f for f in (get_weather, search)}
TOOLS = [{"type": "function", "function": {"name": name, "description": f.__doc__,
                                           "parameters": f.model_json_schema()}}
         for name, f in BY_NAME.items()]
QUESTION = "What is the weather in Paris?"
# no part of what is tested here: the kernel self-test (skipped: a second a run), and a second
# decode thread (on a busy 2-core machine, llama.cpp's threads waiting on each other made the
# tiny model's decode ten times slower than one thread)
FAST = {"CPU_EXTRA_BUFFERS": "off", "N_THREADS": "1"}

# records each run (argv after the log and the mode, stdin) in the log; fails in mode "fail"
TOOL_SCRIPT = """\
import json, pathlib, sys
log, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
arguments = sys.stdin.read()
with log.open("a", encoding="utf-8") as f:
    f.write(json.dumps({"argv": sys.argv[3:], "stdin": arguments}) + "\\n")
if mode == "fail":
    print("the weather service is down", file=sys.stderr)
    sys.exit(1)
print(json.dumps({"sky": "clear", "temp_c": 21}))
"""


@pytest.fixture
def tools_file(tmp_path: Path) -> Path:
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(TOOLS), encoding="utf-8")
    return path


class Tool:
    """The recording tool script of one test: its ``--tool-exec`` command and its runs."""

    def __init__(self, folder: Path, mode: str = "ok") -> None:
        script = folder / "tool.py"
        script.write_text(TOOL_SCRIPT, encoding="utf-8")
        self.log = folder / "runs.jsonl"
        self.command = shlex.join([sys.executable, str(script), str(self.log), mode])

    def runs(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines()]


def _valid(name: str, arguments: object) -> None:
    BY_NAME[name].model_validate(arguments)


def _announced(stderr: str) -> list[tuple[str, object]]:
    """The calls announced on stderr: ``tool: NAME {arguments}``."""
    return [(m[1], json.loads(m[2])) for m in re.finditer(r"^tool: (\S+) (.*)$", stderr, re.M)]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# -- the flags, checked before any model loads ------------------------------------------------

@pytest.fixture
def invoke() -> Iterator:
    """Runs the command in this process (the failures below never load a model); the
    ``ggufllm`` logger that the command sets up is put back afterwards."""
    logger = logging.getLogger("ggufllm")
    saved = logger.handlers[:], logger.level, logger.propagate

    def run(*args: str):
        return CliRunner().invoke(cli, list(args))

    yield run
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.parametrize("content, extra, needle", [
    ("not json", [], "is not JSON"),
    ('"get_weather"', [], "must hold a JSON array of functions"),
    ("[]", [], "holds no functions"),
    ('["get_weather"]', [], "tools[0] must be a JSON object"),
    ('[{"type": "function", "function": {"name": "bad name"}}]', [], "tools[0]: name"),
    (json.dumps([TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "patternProperties": {"^a": {"type": "string"}}}}}]), [],
     "tools[1].function.parameters: the JSON Schema keyword 'patternProperties'"),
    (json.dumps(TOOLS), ["--tool-choice", "get_wether"],
     "has no function of that name (it offers get_weather, search)"),
    (json.dumps(TOOLS), ["--tool-exec", "/no/such/tool --flag"], "cannot run '/no/such/tool'"),
    (json.dumps(TOOLS), ["--tool-exec", "tool 'unclosed"], "No closing quotation"),
    (json.dumps(TOOLS), ["--max-tool-rounds", "3"], "--max-tool-rounds needs --tool-exec CMD"),
    (json.dumps(TOOLS), ["--context", "notes", "--overflow", "truncate-context"],
     "cannot cut the context of a tool conversation"),
], ids=["not json", "not a list", "empty", "not objects", "bad name", "unsupported keyword",
        "unknown choice", "no such command", "bad quoting", "rounds without exec",
        "truncate-context"])
def test_a_bad_tools_flag_is_one_line_before_loading(invoke, tmp_path: Path, content: str,
                                                     extra: list[str], needle: str) -> None:
    path = tmp_path / "tools.json"
    path.write_text(content, encoding="utf-8")
    r = invoke("ask", QUESTION, "-m", str(tmp_path / "none.gguf"), "--tools", str(path), *extra)
    assert r.exit_code == 1, r.output
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")
    assert needle in r.stderr and "none.gguf" not in r.stderr  # no model was looked for


def test_tool_flags_without_tools_are_refused(invoke, tmp_path: Path) -> None:
    r = invoke("ask", QUESTION, "-m", str(tmp_path / "none.gguf"), "--tool-exec", "cat")
    assert r.exit_code == 1 and r.stderr == "error: --tool-exec needs --tools FILE\n"


def test_a_tools_file_holds_a_list_one_function_or_a_tools_key(tmp_path: Path) -> None:
    path = tmp_path / "tools.json"
    for content, names in ((TOOLS, ["get_weather", "search"]), (TOOLS[1], ["search"]),
                           (TOOLS[1]["function"], ["search"]), ({"tools": TOOLS[:1]}, ["get_weather"])):
        path.write_text(json.dumps(content), encoding="utf-8")
        assert [t.name for t in read_tools(path)] == names
    path.write_bytes(b"\xff[]")
    with pytest.raises(CliError, match="not UTF-8"):
        read_tools(path)


# -- on the tiny gpt-oss ----------------------------------------------------------------------

def test_a_forced_call_without_exec_prints_one_json_line(tiny_gguf, tools_file: Path) -> None:
    r = ggufllm("ask", QUESTION, "-m", str(tiny_gguf("q8_0")), "--tools", str(tools_file),
                "--tool-choice", "required", "--seed", "3", "--max-tokens", "96", env=FAST)
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()  # the call, and nothing else (no empty answer line)
    call = json.loads(line)
    assert set(call) == {"id", "name", "arguments"} and call["id"].startswith("call_")
    _valid(call["name"], call["arguments"])
    assert _announced(r.stderr) == [(call["name"], call["arguments"])]


def test_json_names_the_forced_function_and_its_call(tiny_gguf, tools_file: Path) -> None:
    r = ggufllm("ask", QUESTION, "-m", str(tiny_gguf("q8_0")), "--tools", str(tools_file),
                "--tool-choice", "search", "--seed", "5", "--max-tokens", "96", "--json", "-q",
                env=FAST)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (call,) = out["tool_calls"]
    assert call["name"] == "search" and out["finish_reason"] == "tool_call"
    _valid("search", call["arguments"])
    assert out["tool_rounds"] == [] and out["answer"] == ""
    assert r.stderr == ""  # -q: not even the announcement


def test_exec_runs_the_forced_call_then_the_model_chooses(tiny_gguf, tools_file: Path,
                                                          tmp_path: Path) -> None:
    tool = Tool(tmp_path)
    r = ggufllm("ask", QUESTION, "-m", str(tiny_gguf("q8_0")), "--tools", str(tools_file),
                "--tool-choice", "get_weather", "--seed", "2", "--max-tokens", "96",
                "--tool-exec", tool.command, "--max-tool-rounds", "1", env=FAST)
    # get_weather is forced in the first reply only; the second chooses (auto): it answers, or
    # it calls again and that is past --max-tool-rounds 1 (not run)
    runs, announced = tool.runs(), _announced(r.stderr)
    assert len(runs) == 1 and announced[0][0] == "get_weather"
    for run, (name, arguments) in zip(runs, announced, strict=False):
        assert run["argv"] == [name]
        assert json.loads(run["stdin"]) == arguments
        _valid(name, arguments)
    assert r.stderr.count('  -> {"sky": "clear", "temp_c": 21}') == 1
    if r.returncode == 1:
        assert len(announced) == 2 and _errors(r.stderr) == [
            f"error: the model still called {announced[1][0]} after 1 round of tool calls "
            "(--max-tool-rounds 1); raise it"]
    else:
        assert r.returncode == 0 and len(announced) == 1, r.stderr


def test_a_failing_command_is_told_to_the_model(tiny_gguf, tools_file: Path,
                                                tmp_path: Path) -> None:
    tool = Tool(tmp_path, "fail")
    r = ggufllm("ask", QUESTION, "-m", str(tiny_gguf("q8_0")), "--tools", str(tools_file),
                "--tool-choice", "required", "--seed", "4", "--max-tokens", "96",
                "--tool-exec", tool.command, "--max-tool-rounds", "1", env=FAST)
    name = _announced(r.stderr)[0][0]
    assert (f"notice: {name} failed (exit status 1); the model is told: error: the weather "
            "service is down") in r.stderr
    # the failure went back as the result, and the model replied again (answer or call)
    assert len(tool.runs()) == 1 and r.returncode in (0, 1)


def test_auto_either_answers_or_stops_at_max_rounds(tiny_gguf, tools_file: Path,
                                                    tmp_path: Path) -> None:
    """Whether the random model calls is its choice: what holds either way."""
    tool = Tool(tmp_path)
    r = ggufllm("ask", QUESTION, "-m", str(tiny_gguf("q8_0")), "--tools", str(tools_file),
                "--seed", "1", "--max-tokens", "24", "--tool-exec", tool.command,
                "--max-tool-rounds", "1", "--json", env=FAST)
    runs = tool.runs()
    assert len(runs) == len(_announced(r.stderr)) <= 1
    if r.returncode == 0:
        out = json.loads(r.stdout)
        assert out["tool_calls"] == [] and len(out["tool_rounds"]) == len(runs)
        assert out["finish_reason"] in ("stop", "length")
    else:
        assert len(runs) == 1 and "--max-tool-rounds 1" in _errors(r.stderr)[0], r.stderr


def test_a_model_without_tool_calls_says_so_before_it_loads(default_gguf: Path,
                                                             tools_file: Path, monkeypatch,
                                                             invoke) -> None:
    from ggufllm.service import LLMService

    def load(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(LLMService, "load", load)
    r = invoke("ask", QUESTION, "-m", str(default_gguf), "--tools", str(tools_file), "-q")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        'error: this model has no tool-call support: tools, tool calls and tool results (the '
        '"tool" role) need a gpt-oss (harmony) model']


# -- the loop, over scripted replies ----------------------------------------------------------

class ScriptedService:
    """Replies from a script (lists of chunks) and keeps the conversations it was sent."""

    def __init__(self, *replies: list[Chunk]) -> None:
        self.replies = list(replies)
        self.sent: list[list[Turn]] = []
        self.choices: list[object] = []

    def chat_stream(self, turns: Sequence[Turn], **params: object) -> Iterator[Chunk]:
        self.sent.append(list(turns))
        self.choices.append(params.get("tool_choice"))
        return (chunk for chunk in self.replies.pop(0))


CALL = [Chunk("Look it up.", "analysis"),
        Chunk("", "commentary", tool_call=ToolCallDelta(0, "call_1", "get_weather")),
        Chunk("", "commentary", tool_call=ToolCallDelta(0, arguments='{"city": "Paris", ')),
        Chunk("", "commentary", tool_call=ToolCallDelta(0, arguments='"unit": "c"}')),
        Chunk("", "commentary", finish_reason="tool_call")]
ANSWER = [Chunk("Clear, 21 °C.", "final"), Chunk("", finish_reason="stop")]


@pytest.mark.parametrize("mode, result", [
    ("ok", '{"sky": "clear", "temp_c": 21}'),
    ("fail", "error: the weather service is down"),
])
def test_the_loop_ends_when_a_reply_calls_nothing(tools_file: Path, tmp_path: Path, capsys,
                                                  mode: str, result: str) -> None:
    tool = Tool(tmp_path, mode)
    service = ScriptedService(CALL, ANSWER)
    setup = ToolSetup(read_tools(tools_file), "auto", tuple(shlex.split(tool.command)))
    first = [Turn("user", QUESTION)]
    talk = converse(service, setup, first, {}, instructions=None, echo=Echo.LIVE,  # type: ignore[arg-type]
                    show_reasoning=False)
    call = ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "c"}')
    assert service.sent[1] == [*first, Turn("assistant", "", "Look it up.", (call,)),
                               Turn("tool", result, name="get_weather")]
    assert tool.runs() == [{"argv": ["get_weather"], "stdin": call.arguments}]
    assert talk.answer.text == "Clear, 21 °C." and capsys.readouterr().out == "Clear, 21 °C.\n"
    assert talk.record() == {"tool_calls": [], "tool_rounds": [{"reasoning": "Look it up.", "calls": [
        {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris", "unit": "c"},
         "result": result, "failed": mode == "fail"}]}]}


def test_a_forced_choice_holds_for_the_first_reply_then_max_rounds_ends_the_loop(
        tools_file: Path, tmp_path: Path) -> None:
    tool = Tool(tmp_path)
    service = ScriptedService(CALL, CALL, CALL)
    tools = read_tools(tools_file)
    setup = ToolSetup(tools, tool_choice_of("required", tools), tuple(shlex.split(tool.command)),
                      max_rounds=2)
    with pytest.raises(CliError, match=r"still called get_weather after 2 rounds of tool calls "
                                       r"\(--max-tool-rounds 2\); raise it$"):
        converse(service, setup, [Turn("user", QUESTION)], {}, instructions=None,  # type: ignore[arg-type]
                 echo=Echo.OFF, show_reasoning=False)
    assert service.choices == ["required", "auto", "auto"]
    assert len(tool.runs()) == 2  # the third call is not run


def test_a_command_past_its_timeout_is_killed_with_what_it_started(tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text("import subprocess, sys, time\n"
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                      "time.sleep(60)\n", encoding="utf-8")
    started = time.monotonic()
    run = run_tool([sys.executable, str(script)], ToolCall("call_1", "slow", "{}"), 1.0)
    # the grandchild holds the pipes too: only killing the group ends the read
    assert time.monotonic() - started < 30
    assert run.result == "error: no result within 1 s"
    assert run.failure == "no result within 1 s (--tool-timeout)"
