"""Output readers on real vocabularies: an end-of-generation token keeps the answer.

A stop *string* ends the answer before it; an end-of-generation *token* ends it
after everything decoded so far, including the text the stop-string window holds
back. Scripted token sequences over the embedded Gemma's real vocabulary, and a
real generation with SmolLM2-Instruct, whose answers end at ``<|im_end|>``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ggufllm import LLMService
from ggufllm.engine.native import NativeModel
from ggufllm.engine.output import TextReader

ANSWER = "Paris is the capital of France."
# Long enough that the window holds back most of a short answer.
NEVER = "<<a stop string that never comes>>"


@pytest.fixture(scope="module")
def gemma(default_gguf: Path) -> Iterator[NativeModel]:
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    model = NativeModel(str(default_gguf), vocab_only=True)
    yield model
    model.close()


def read(model: NativeModel, tokens: Sequence[int], stops: Sequence[str]) -> tuple[str, str]:
    """What the decode loop shows for ``tokens``, and how it ends."""
    reader = TextReader(model, stops)
    texts: list[str] = []
    finish = None
    for token in tokens:
        chunks, finish = reader.feed(token)
        texts += [c.text for c in chunks]
        if finish is not None:
            break
    ending = finish or "length"
    texts += [c.text for c in reader.flush(ending)]
    return "".join(texts), ending


def words(model: NativeModel, text: str) -> list[int]:
    return model.tokenize(text, add_special=False, parse_special=False)


@pytest.mark.parametrize("stops", [(), ("\n\n",), ("\nQuestion:", "\n\n"), (NEVER,)])
@pytest.mark.parametrize("eog", ["<eos>", "<end_of_turn>"])
def test_end_of_generation_token_keeps_the_whole_answer(gemma, stops, eog):
    eog_id = gemma.special_token_id(eog)
    assert eog_id is not None and gemma.is_eog(eog_id)
    assert read(gemma, words(gemma, ANSWER) + [eog_id], stops) == (ANSWER, "stop")


def test_stop_string_cuts_before_itself_and_drops_the_rest(gemma):
    tokens = words(gemma, ANSWER + "\n\nQuestion: and Spain?") + [gemma.eos_id]
    assert read(gemma, tokens, ("\n\n",)) == (ANSWER, "stop")


def test_stop_string_right_before_end_of_generation(gemma):
    tokens = words(gemma, ANSWER + "\n\n") + [gemma.eos_id]
    assert read(gemma, tokens, ("\n\n",)) == (ANSWER, "stop")


def test_cut_by_length_releases_the_window(gemma):
    assert read(gemma, words(gemma, ANSWER), (NEVER,)) == (ANSWER, "length")


def test_flush_after_end_of_generation_adds_nothing(gemma):
    reader = TextReader(gemma, (NEVER,))
    shown = [c.text for t in words(gemma, ANSWER) for c in reader.feed(t)[0]]
    chunks, finish = reader.feed(gemma.eos_id)
    assert finish == "stop"
    assert "".join(shown) + "".join(c.text for c in chunks) == ANSWER
    assert reader.flush("stop") == [] and reader.flush("stop") == []


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> Iterator[LLMService]:
    logging.getLogger("ggufllm.llama_cpp").setLevel(logging.ERROR)
    with LLMService(smollm2_gguf, max_length=512) as svc:
        yield svc


def test_real_answer_ending_at_im_end_is_the_same_with_stop_strings(smollm2):
    ask = dict(question="What is the capital of France? Answer in one sentence.",
               max_tokens=64, temperature=0.0)
    plain = smollm2.answer(**ask)
    with_stop = smollm2.answer(**ask, stop=[NEVER])
    assert plain.finish_reason == "stop", "SmolLM2 should end its answer with <|im_end|>"
    assert "Paris" in plain.text
    assert with_stop.text == plain.text and with_stop.finish_reason == "stop"
