"""Right answers on the first try from the embedded base model, at the shipped defaults.

The completion prompt's worked question/answer frame is what makes the 270M base
model answer these (without it, Tokyo and Shakespeare came in 2 of 5 runs).
``benchmarks/first_answer.py`` measures the rate over random seeds.
"""

from __future__ import annotations

import pytest

from ggufllm import LLMService, Turn
from ggufllm.engine.prompt import _COMPLETION_STOPS

# (question, accepted words, right answers needed of the 5 seeds): the rates measured over
# 20 seeds were Paris 19, Tokyo 19, Leonardo 18 and Shakespeare 14.
QUESTIONS = [
    ("What is the capital of France?", ("Paris",), 5),
    ("What is the capital of Japan?", ("Tokyo",), 4),
    ("Who painted the Mona Lisa?", ("Leonardo", "Vinci"), 4),
    ("Who wrote Hamlet?", ("Shakespeare",), 3),
]
SEEDS = range(2, 7)


@pytest.mark.parametrize("question,expected,needed", QUESTIONS)
def test_factual_questions_at_the_default_settings(service: LLMService, question: str,
                                                   expected: tuple[str, ...], needed: int):
    cfg = service.generation_config
    assert (cfg.temperature, cfg.top_p, cfg.top_k) == (0.7, 0.9, 50)  # the shipped defaults
    answers = []
    for seed in SEEDS:
        # max_tokens only bounds a wrong, rambling answer (the shared fixture's window is 1024)
        answers.append(service.answer(question, seed=seed, max_tokens=64))
    right = [a.text for a in answers if any(word in a.text for word in expected)]
    assert len(right) >= needed, [a.text for a in answers]
    assert all(a.finish_reason == "stop" for a in answers)  # short answers, ended by the stops


def test_the_frame_is_a_shared_prefix_and_the_context_comes_before_the_question(
        service: LLMService):
    engine = service._engine
    assert engine is not None
    cfg = service.generation_config
    ctx = "The Zorblat festival is held every spring in the town of Quenby."
    a = engine.prompts.build([Turn("user", f"Context:\n{ctx}\n\nQuestion: Where is it held?")], cfg)
    b = engine.prompts.build([Turn("user", f"Context:\n{ctx}\n\nQuestion: When is it held?")], cfg)
    common = next(i for i, (x, y) in enumerate(zip(a.tokens, b.tokens, strict=False)) if x != y)
    text = b"".join(engine.model.piece(t) for t in a.tokens).decode("utf-8")
    # everything up to the question is shared (the KV cache reuses it across questions)
    assert common >= len(a.tokens) - 8
    assert set(_COMPLETION_STOPS) <= set(a.stops)
    assert text.index("Answer: Berlin.") < text.index("Quenby") < text.index("Where is it held?")
