"""The CLI's feedback on long work: the load bar and the prompt spinner (stderr, terminal only)."""

from __future__ import annotations

import io
import time

from ggufllm.cli.progress import LoadBar, PromptSpinner


def test_load_bar_appears_only_for_a_load_that_takes_a_moment():
    quick = io.StringIO()
    bar = LoadBar("model.gguf", enabled=True, delay=10.0, stream=quick)
    for f in (0.0, 0.5, 1.0):
        assert bar(f) is True  # never cancels
    bar.close()
    assert quick.getvalue() == ""

    slow = io.StringIO()
    bar = LoadBar("model.gguf", enabled=True, delay=0.0, stream=slow)
    for f in (0.0, 0.25, 0.5):
        bar(f)
    text = slow.getvalue()
    bar.close()
    assert "loading model.gguf" in text and "50%" in text

    off = io.StringIO()
    bar = LoadBar("model.gguf", enabled=False, delay=0.0, stream=off)
    bar(0.5)
    bar.close()
    assert off.getvalue() == ""


def test_prompt_spinner_shows_the_evaluated_tokens_then_erases_itself():
    out = io.StringIO()
    spinner = PromptSpinner(enabled=True, delay=0.05, stream=out).start()
    spinner.progress(512, 2048)
    time.sleep(0.4)
    spinner.stop()
    text = out.getvalue()
    assert "evaluating the prompt: 512/2048 tokens" in text
    assert text.endswith("\r\033[K")  # the line is erased before the answer prints
    n = len(text)
    time.sleep(0.2)
    assert len(out.getvalue()) == n  # stopped means stopped


def test_prompt_spinner_stays_silent_for_a_quick_prompt():
    out = io.StringIO()
    spinner = PromptSpinner(enabled=True, delay=5.0, stream=out).start()
    spinner.stop()
    assert out.getvalue() == ""
