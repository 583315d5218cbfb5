"""``ggufllm chat`` driven in a real terminal (a pty), as a person drives it.

What the model saw is checked through ``/save`` (the history the next prompt is
built from), never by trusting the answer text.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ">>> "


def spawn(*args: str, cwd: Path, **env_vars: str) -> pexpect.spawn:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="dumb", **env_vars)
    # surrogateescape: a test can type bytes that are not UTF-8 ("\udcff" sends 0xff)
    child = pexpect.spawn(sys.executable, ["-m", "ggufllm.cli", "chat", *args], cwd=str(cwd),
                          env=env, encoding="utf-8", codec_errors="surrogateescape",
                          timeout=300, dimensions=(40, 200))
    child.logfile_read = open(cwd / "terminal.log", "w", encoding="utf-8",  # noqa: SIM115
                              errors="surrogateescape")
    return child


def test_chat_in_a_terminal_survives_ctrl_c(tmp_path: Path, default_gguf: Path):
    child = spawn("--model", str(default_gguf), "--temperature", "0", "--max-tokens", "24",
                  cwd=tmp_path)
    try:
        child.expect_exact(PROMPT)
        # turn 1
        child.sendline("My name is Zorblat. What is the capital of France?")
        child.expect("Paris")
        child.expect_exact(PROMPT)
        # a generation parameter, validated: a bad value is refused, the session goes on
        child.sendline("/set temperature -1")
        child.expect("error: .*temperature")
        child.expect_exact(PROMPT)
        child.sendline("/set max_tokens 500")
        child.expect_exact("max_tokens = 500")
        child.expect_exact(PROMPT)
        # turn 2, interrupted once the answer has started
        child.sendline("List the first fifty prime numbers.")
        child.expect_exact("prime numbers.")  # the echo of the line typed
        child.expect(r"\d+, \d+, \d+")  # the answer has started
        child.sendintr()
        child.expect_exact("[interrupted")
        child.expect_exact(PROMPT)
        # turn 3, over several lines
        child.sendline('"""What is')
        child.sendline('my name?"""')
        child.expect_exact(PROMPT)
        child.sendline("/save chat.json")
        child.expect_exact("saved 6 messages")
        child.expect_exact(PROMPT)
        child.send("a line I regret")
        child.expect_exact("regret")
        child.sendintr()  # Ctrl-C with text typed drops the line, as a shell does
        child.expect_exact(PROMPT)
        child.sendline("/save chat2.json")  # the dropped line was never sent
        child.expect_exact("saved 6 messages")
        child.expect_exact(PROMPT)
        # Ctrl-C at an empty prompt (say, one meant for an answer that has just ended) only
        # says how to quit, as `ollama run` does: the conversation is kept
        child.sendintr()
        child.expect_exact("Ctrl-D or /bye")
        child.expect_exact(PROMPT)
        child.sendline("/save chat3.json")
        child.expect_exact("saved 6 messages")
        child.expect_exact(PROMPT)
        child.sendeof()  # Ctrl-D at an empty prompt quits
        child.expect(pexpect.EOF)
    finally:
        child.close()
        child.logfile_read.close()
    assert child.exitstatus == 0, child.before
    saved = json.loads((tmp_path / "chat.json").read_text())
    messages = saved["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert "Zorblat" in messages[0]["content"] and "Paris" in messages[1]["content"]
    assert messages[3].get("interrupted") is True and messages[3]["content"].strip()
    assert not messages[1].get("interrupted")
    # the third turn was built from the whole history, the first turn included
    assert messages[4]["content"] == "What is\nmy name?"
    assert saved["settings"]["max_tokens"] == 500 and saved["settings"]["temperature"] == 0


def test_bytes_that_are_not_utf8_under_a_c_locale_do_not_end_the_chat(tmp_path: Path,
                                                                     default_gguf: Path):
    child = spawn("--model", str(default_gguf), "--temperature", "0", "--max-tokens", "4",
                  cwd=tmp_path, LANG="C", LC_ALL="C")
    try:
        child.expect_exact(PROMPT)
        child.sendline("caf\u00e9 \udcff\udcfe ok?")  # UTF-8 "é", then two invalid bytes
        child.expect_exact("not UTF-8")  # a notice; the line is answered
        child.expect_exact(PROMPT)
        child.sendline("/save chat.json")
        child.expect_exact("saved 2 messages")
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
        child.logfile_read.close()
    assert child.exitstatus == 0, child.before
    messages = json.loads((tmp_path / "chat.json").read_text(encoding="utf-8"))["messages"]
    assert messages[0]["content"] == "caf\u00e9 \ufffd\ufffd ok?"


def chat_piped(args: list[str], lines: list[str], cwd: Path,
               file_size_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")

    def limit() -> None:  # in the child: writes past the limit fail (EFBIG) as a full disk would
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "ggufllm.cli", "chat", *args],
                          input="\n".join(lines) + "\n", capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600,
                          preexec_fn=limit if file_size_limit is not None else None)


def test_a_save_that_fails_keeps_the_old_file(tmp_path: Path, default_gguf: Path):
    old = tmp_path / "chat.json"
    old.write_text(json.dumps({"messages": [{"role": "user", "content": "precious"}]}))
    before = old.read_bytes()
    lines = ["/system " + "long instructions " * 500, "/save chat.json", "/system",
             "/save other.json"]
    r = chat_piped(["--model", str(default_gguf)], lines, tmp_path, file_size_limit=4096)
    assert r.returncode == 0, r.stderr
    assert "error: cannot write chat.json" in r.stderr and "Traceback" not in r.stderr
    assert old.read_bytes() == before  # the old file is whole, not truncated
    # the chat went on, and no temporary file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "other.json"]


def test_a_long_chat_drops_the_oldest_turns(tmp_path: Path, default_gguf: Path):
    filler = "Tell me about the weather in the mountains today, please. " * 6
    lines = [f"My name is Zorblat. {filler}", f"{filler} What is the capital of France?",
             f"{filler} And of Japan?", "/save chat.json", "/show"]
    r = chat_piped(["--model", str(default_gguf), "--ctx", "256", "--max-tokens", "16",
                    "--temperature", "0"], lines, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "error:" not in r.stderr
    assert "dropped the" in r.stderr  # one notice line, the session went on
    messages = json.loads((tmp_path / "chat.json").read_text())["messages"]
    assert messages[-2]["content"].endswith("And of Japan?") and messages[-1]["role"] == "assistant"
    assert not any("Zorblat" in m["content"] for m in messages)  # the oldest turn is gone
    assert "of 256 tokens used" in r.stderr


def test_slash_commands_and_system(tmp_path: Path, default_gguf: Path):
    lines = ["/help", "/system Answer in French.", "/set top_k 5", "/set nonsense 1",
             "/set seed 7", "What is the capital of Italy?", "/clear", "/save empty.json",
             "/bye", "never sent"]
    r = chat_piped(["--model", str(default_gguf), "--max-tokens", "8"], lines, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "/save FILE" in r.stderr and "no parameter 'nonsense'" in r.stderr
    saved = json.loads((tmp_path / "empty.json").read_text())
    assert saved["messages"] == [] and saved["system"] == "Answer in French."
    assert saved["settings"]["top_k"] == 5 and saved["settings"]["seed"] == 7


def test_a_message_too_long_for_the_window_is_refused_and_the_chat_goes_on(tmp_path: Path,
                                                                           default_gguf: Path):
    lines = ["What is the capital of France?", "word " * 400, "/save chat.json"]
    r = chat_piped(["--model", str(default_gguf), "--ctx", "256", "--max-tokens", "16",
                    "--temperature", "0"], lines, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "error: the prompt is" in r.stderr and "/clear, or a shorter message" in r.stderr
    messages = json.loads((tmp_path / "chat.json").read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # nothing lost, nothing added
    assert "Paris" in messages[1]["content"]
