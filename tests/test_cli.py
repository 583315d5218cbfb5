"""The ggufllm command, run as a user runs it (a real subprocess; the runs that load no model
are forked from one warm interpreter, each a process of its own: ``tests/cli_runs.py``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .cli_runs import ggufllm_runs
from .gguf_corpus import corpus

ROOT = Path(__file__).resolve().parent.parent


def ggufllm(*args: str, input: str | bytes | None = None, cwd: Path | None = None,
            env: dict[str, str] | None = None):
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "ggufllm.cli", *args], capture_output=True,
                          text=not isinstance(input, bytes), input=input if input is not None else "",
                          cwd=cwd, timeout=300, env=full_env)


def test_ask_answers_with_the_default_model(tmp_path: Path):
    # --ctx 512 is below the default budget (DEFAULT_MAX_TOKENS, 1000 built in, 2000 set in
    # the environment here): a budget not typed is capped to what the window leaves, and the
    # answer still comes (only a typed --max-tokens that cannot fit is refused:
    # test_known_failures_print_one_line)
    r = ggufllm("ask", "What is the capital of France?", "--temperature", "0", "--ctx", "512",
                cwd=tmp_path, env={"DEFAULT_MAX_TOKENS": "2000"})
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    # one notice line, on stderr, saying what was loaded and how to convert gpt-oss
    # (a CPU whose repacked kernels fail the self-test adds that notice: docs/cpus.md)
    notices = [line for line in r.stderr.splitlines()
               if line.strip() and "failed a self-test" not in line]
    assert len(notices) == 1 and "default model" in notices[0] and "convert" in notices[0]


def test_ask_json_with_the_context_piped_in(default_gguf: Path):
    r = ggufllm("ask", "Where is the Zorblat festival held?", "--context-file", "-",
                "--model", str(default_gguf), "--temperature", "0", "--json",
                input="The Zorblat festival is held every spring in the town of Quenby.")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Quenby" in out["answer"] and out["finish_reason"] == "stop"
    assert out["timings"]["n_generated"] >= 1


def test_no_stream_prints_the_same_answer(default_gguf: Path):
    # --top-k 1 is greedy whatever the temperature and the seed
    args = ["ask", "Who wrote Hamlet?", "--model", str(default_gguf), "--temperature", "1.5",
            "--top-k", "1", "--top-p", "0.5", "--seed", "5"]
    streamed, whole = ggufllm(*args), ggufllm(*args, "--no-stream")
    assert streamed.returncode == whole.returncode == 0
    assert streamed.stdout == whole.stdout and "Shakespeare" in streamed.stdout
    stopped = ggufllm(*args, "--stop", "Shakespeare")
    assert stopped.returncode == 0
    assert stopped.stdout.strip() == streamed.stdout[: streamed.stdout.index("Shakespeare")].strip()


KNOWN_FAILURES = [
    (["ask", "q", "--model", "/no/such/model.gguf"], "no file at '/no/such/model.gguf'"),
    (["ask", "q", "--temperature", "nan"], "--temperature: "),
    (["ask", "q", "--max-tokens", "0"], "--max-tokens: "),
    (["ask", "q", "--top-k", "-3"], "--top-k: "),
    (["ask", "q", "--ctx", "10"], "--ctx: "),
    (["ask", "   "], "the question is empty"),
    (["ask", "q", "--max-tokens", "5000"], "--max-tokens 5000 leaves no room"),
    (["ask", "q", "--ctx", "512", "--max-tokens", "512"], "--max-tokens 512 leaves no room"),
    (["ask", "q", "--context", "a", "--context-file", "-"], "not both"),
]
HELPED = ["ask", "chat", "models", "info", "convert", "verify"]
MISTYPED = [
    (["ask", "--temprature", "0.2", "q"],
     "error: No such option '--temprature'. Did you mean '--temperature'? "
     "(see 'ggufllm ask -h')"),
    (["ask", "--temperature", "abc", "q"],
     "error: Invalid value for '--temperature' / '-t': 'abc' is not a valid float "
     "(see 'ggufllm ask -h')"),
    (["askk", "q"], "error: No such command 'askk'. Did you mean 'ask'? (see 'ggufllm -h')"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], Any]:
    """The runs that load no model, each a process of its own (``tests/cli_runs.py``), in a
    folder with no models/llm: ``ggufllm ARGS`` -> what it left. (Failures that a real
    interpreter start prints alone: test_corrupt_model_is_one_line and the others here.)"""
    cases = ([(*args, "-q") for args, _ in KNOWN_FAILURES] + [(c, "-h") for c in HELPED]
             + [tuple(args) for args, _ in MISTYPED])
    return {r.args: r for r in ggufllm_runs(cases, tmp_path_factory.mktemp("runs"))}


@pytest.mark.parametrize("args,needle", KNOWN_FAILURES)
def test_known_failures_print_one_line(args, needle, runs):
    r = runs[(*args, "-q")]
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    # one line: checked before a model loads (-q silences the embedded-model notice)
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert needle in r.stderr


def test_an_answer_the_window_cut_says_so_not_the_budget(default_gguf: Path):
    # a base model counting on: the capped default budget ends where the window ends
    r = ggufllm("ask", "Count from one to a thousand: one, two, three,", "--ctx", "128",
                "--temperature", "0", "--model", str(default_gguf))
    assert r.returncode == 0, r.stderr
    assert "context window" in r.stderr and "--max-tokens 1000" not in r.stderr, r.stderr


def test_corrupt_model_is_one_line(tmp_path: Path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(corpus()["truncated_in_data"])
    r = ggufllm("ask", "q", "--model", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: cannot load")


def test_bad_environment_is_one_line(default_gguf: Path):
    r = ggufllm("ask", "q", "--model", str(default_gguf), env={"DEFAULT_TEMPERATURE": "hot"})
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


def test_reasoning_goes_to_stderr_and_the_answer_to_stdout(capsys):
    from ggufllm import Chunk
    from ggufllm.cli import print_stream

    chunks = [Chunk("Thinking", "analysis", (1,)), Chunk(" hard", "analysis", (2,)),
              Chunk("Par", "final", (3,)), Chunk("is", "final", (4,)),
              Chunk("", finish_reason="stop")]
    answer = print_stream(iter(chunks), show_reasoning=True)
    out, err = capsys.readouterr()
    assert out == "Paris\n" and "Thinking hard" in err and answer.reasoning == "Thinking hard"
    print_stream(iter(chunks), show_reasoning=False)
    out, err = capsys.readouterr()
    assert out == "Paris\n" and err == ""


@pytest.fixture(scope="module")
def hamlet_piped(default_gguf: Path) -> subprocess.CompletedProcess:
    """``ask -`` with the question piped in, --stats, -q, a flag over a bad environment
    (DEFAULT_TEMPERATURE is invalid, but --temperature replaces it): run once, read by the
    two tests below."""
    return ggufllm("ask", "-", "--model", str(default_gguf), "--temperature", "0", "--stats",
                   "-q", input="Who wrote Hamlet?\n", env={"DEFAULT_TEMPERATURE": "hot"})


def _stats(r: subprocess.CompletedProcess) -> re.Match:
    lines = r.stderr.strip().splitlines()  # -q: no notice; --stats: one line
    assert len(lines) == 1, r.stderr
    m = re.match(r"ttft (\d+\.\d+) s · prompt (\d+) tokens \((\d+) cached, (\d+) evaluated", lines[0])
    assert m and "tok/s" in lines[0], lines[0]
    return m


def test_a_piped_question_with_stats_and_a_flag_over_a_bad_environment(hamlet_piped):
    r = hamlet_piped
    assert r.returncode == 0, r.stderr  # no error: --temperature replaced the bad value
    assert "Shakespeare" in r.stdout
    m = _stats(r)
    assert int(m[2]) == int(m[3]) + int(m[4]) > 0


def test_an_answer_cut_by_max_tokens_says_so(default_gguf: Path):
    # -v after the subcommand works, and implies the stats line
    r = ggufllm("ask", "List the first fifty prime numbers.", "--model", str(default_gguf),
                "--temperature", "0", "--max-tokens", "3", "-v")
    assert r.returncode == 0, r.stderr
    assert "cut at --max-tokens 3" in r.stderr and "3 generated" in r.stderr


def test_a_context_that_does_not_fit_names_the_numbers_and_the_fixes(default_gguf: Path):
    r = ggufllm("ask", "What is this about?", "--model", str(default_gguf), "--ctx", "256",
                "--max-tokens", "64", "--context", "The quick brown fox jumps. " * 30)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    error = r.stderr.strip().splitlines()[-1]
    m = re.search(r"the prompt is (\d+) tokens and --max-tokens is 64: (\d+) tokens do not fit "
                  r"the context window of 256 \(--ctx\); use (.*)", error)
    assert m, error
    n_prompt = int(m[1])
    assert int(m[2]) == n_prompt + 64 and f"--ctx {n_prompt + 64} or more" in m[3]
    assert "--overflow truncate-context" in m[3]


def test_context_file_that_is_not_utf8_is_one_line(tmp_path: Path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait".encode("latin-1"))
    r = ggufllm("ask", "q", "--context-file", str(bad), "-q")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "not UTF-8" in r.stderr and "0xe9 at offset 3" in r.stderr
    r = ggufllm("ask", "-", "-q", input=b"\xff\xfe question")
    assert r.returncode == 1 and b"stdin is not UTF-8" in r.stderr


def test_ctx_past_the_trained_length_warns_before_loading(default_gguf: Path):
    r = ggufllm("ask", "q", "--model", str(default_gguf), "--ctx", "40000", "--max-tokens", "40000")
    assert r.returncode == 1
    warning, error = r.stderr.strip().splitlines()
    assert "--ctx 40000 is past the 32768 tokens" in warning
    assert "--max-tokens 40000 leaves no room" in error


@pytest.fixture
def models_dir(tmp_path: Path, default_gguf: Path) -> Path:
    folder = tmp_path / "models" / "llm"
    folder.mkdir(parents=True)
    (folder / "gemma-3-270m-q4_k_m.gguf").symlink_to(default_gguf)
    return tmp_path


def test_a_mistyped_path_suggests_near_matches(models_dir: Path):
    r = ggufllm("ask", "q", "--model", "models/llm/gemma-3-270m-q4km.gguf", cwd=models_dir)
    assert r.returncode == 1
    assert "no file at 'models/llm/gemma-3-270m-q4km.gguf'" in r.stderr
    assert "did you mean 'models/llm/gemma-3-270m-q4_k_m.gguf'" in r.stderr
    assert "convert" not in r.stderr  # the convert hint is for when there is no model at all


def test_models_lists_what_ask_would_use(models_dir: Path, default_gguf: Path):
    other = models_dir / "elsewhere"
    other.mkdir()
    (other / "chosen-Q8_0.gguf").symlink_to(default_gguf)
    rows = [json.loads(line) for line in ggufllm("models", "--json", cwd=models_dir).stdout.splitlines()]
    assert [r["default"] for r in rows] == [True]
    assert rows[0]["quantization"] == "Q4_K_M" and rows[0]["architecture"] == "gemma3"
    r = ggufllm("models", "--json", cwd=models_dir, env={"LLM_MODEL_PATH": str(other)})
    rows = {Path(r["path"]).name: r for r in map(json.loads, r.stdout.splitlines())}
    assert rows["chosen-Q8_0.gguf"]["default"] and not rows["gemma-3-270m-q4_k_m.gguf"]["default"]
    human = ggufllm("models", cwd=models_dir).stdout
    assert "* " in human and "Q4_K_M" in human and "gemma3" in human


def test_info_without_a_path_describes_what_ask_would_use(models_dir: Path):
    r = ggufllm("info", "--json", cwd=models_dir)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["path"].endswith("gemma-3-270m-q4_k_m.gguf") and facts["quantization"] == "Q4_K_M"


@pytest.mark.parametrize("command", HELPED)
def test_short_help_shows_an_example(command: str, runs):
    r = runs[(command, "-h")]
    assert r.returncode == 0 and "Example" in r.stdout
    if command in ("ask", "chat"):
        assert "[default: 0.7]" in " ".join(r.stdout.split())  # --temperature shows its default


def test_system_really_sets_the_instructions(default_gguf: Path, hamlet_piped):
    r = ggufllm("ask", "Who wrote Hamlet?", "--model", str(default_gguf), "--json",
                "--max-tokens", "4", "--system", "Answer in one short sentence, in French.")
    assert r.returncode == 0, r.stderr
    # the same question without --system (piped: the trailing newline is not the question's)
    assert json.loads(r.stdout)["timings"]["n_prompt"] > int(_stats(hamlet_piped)[2])


def test_kv_cache_file_is_saved_and_reused_by_the_next_run(default_gguf: Path, tmp_path: Path):
    cache = tmp_path / "doc.kv"
    args = ("ask", "Where is the festival held?", "-m", str(default_gguf), "--json",
            "--temperature", "0", "--max-tokens", "12", "--kv-cache", str(cache),
            "--context", "The Zorblat festival is held every spring in the town of Quenby.")
    first = ggufllm(*args)
    assert first.returncode == 0, first.stderr
    assert cache.stat().st_size > 0
    second = ggufllm(*args)
    assert second.returncode == 0, second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["timings"]["n_cached"] == 0
    assert b["timings"]["n_cached"] > 0  # the prompt's pages came back from the file
    assert b["answer"] == a["answer"]
    # a bad file is a notice, never a failure, and is left as it was:
    # test_kvfile_trust.py::test_ask_leaves_the_file_alone_when_its_load_failed


def test_a_mistyped_option_is_one_error_line(runs):
    for args, wanted in MISTYPED:
        r = runs[tuple(args)]
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [wanted]
        assert r.stdout == ""
