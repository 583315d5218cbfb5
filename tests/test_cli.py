"""The ggufllm command, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .gguf_corpus import corpus


def ggufllm(*args: str, input: str | None = None, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "ggufllm.cli", *args], capture_output=True,
                          text=True, input=input, cwd=cwd, timeout=300)


def test_ask_answers_with_the_default_model(tmp_path: Path):
    r = ggufllm("ask", "What is the capital of France?", "--temperature", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    # one notice line, on stderr, saying what was loaded and how to convert gpt-oss
    notices = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(notices) == 1 and "default model" in notices[0] and "convert" in notices[0]


def test_ask_json_with_context_file(tmp_path: Path, default_gguf: Path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The Zorblat festival is held every spring in the town of Quenby.")
    r = ggufllm("ask", "Where is the Zorblat festival held?", "--context-file", str(ctx),
                "--model", str(default_gguf), "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Quenby" in out["answer"] and out["finish_reason"] == "stop"
    assert out["timings"]["n_generated"] >= 1


def test_no_stream_prints_the_same_answer(default_gguf: Path):
    args = ["ask", "Who wrote Hamlet?", "--model", str(default_gguf), "--temperature", "0"]
    streamed, whole = ggufllm(*args), ggufllm(*args, "--no-stream")
    assert streamed.returncode == whole.returncode == 0
    assert streamed.stdout == whole.stdout


@pytest.mark.parametrize("args,needle", [
    (["ask", "q", "--model", "/no/such/model.gguf"], "no GGUF model"),
    (["ask", "q", "--temperature", "nan"], "temperature"),
    (["ask", "q", "--max-tokens", "0"], "max_tokens"),
])
def test_known_failures_print_one_line(args, needle, tmp_path: Path):
    r = ggufllm(*args, cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    # one line: parameters are checked before a model is even resolved (no notice line)
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert needle in r.stderr


def test_corrupt_model_is_one_line(tmp_path: Path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(corpus()["truncated_in_data"])
    r = ggufllm("ask", "q", "--model", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: cannot load")


def test_bad_environment_is_one_line(default_gguf: Path):
    import os

    env = dict(os.environ, DEFAULT_TEMPERATURE="hot")
    r = subprocess.run([sys.executable, "-m", "ggufllm.cli", "ask", "q", "--model",
                        str(default_gguf)], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "DEFAULT_TEMPERATURE" in r.stderr and "Traceback" not in r.stderr


def test_info_describes_the_file(default_gguf: Path):
    r = ggufllm("info", str(default_gguf), "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["architecture"] == "gemma3" and facts["context_length"] == 32768
    assert facts["chat_template"] is False and facts["file_size"] == default_gguf.stat().st_size
    types = {t["type"]: t for t in facts["tensor_types"]}
    assert types["Q4_K"]["count"] > 0 and sum(t["count"] for t in types.values()) == facts["tensors"]
    human = ggufllm("info", str(default_gguf))
    assert "parameters" in human.stdout and "Q8_0" in human.stdout


def test_chat_keeps_the_conversation(default_gguf: Path):
    r = ggufllm("chat", "--model", str(default_gguf), "--temperature", "0", "--max-tokens", "16",
                input="What is the capital of France?\nAnd of Italy?\n\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert len([line for line in r.stdout.splitlines() if line.strip()]) >= 2


def test_reasoning_goes_to_stderr_and_the_answer_to_stdout(capsys):
    from ggufllm import Chunk
    from ggufllm.cli import _print_stream

    chunks = [Chunk("Thinking", "analysis", (1,)), Chunk(" hard", "analysis", (2,)),
              Chunk("Par", "final", (3,)), Chunk("is", "final", (4,)),
              Chunk("", finish_reason="stop")]
    answer = _print_stream(iter(chunks), show_reasoning=True)
    out, err = capsys.readouterr()
    assert out == "Paris\n" and "Thinking hard" in err and answer.reasoning == "Thinking hard"
    _print_stream(iter(chunks), show_reasoning=False)
    out, err = capsys.readouterr()
    assert out == "Paris\n" and err == ""
