"""Right answers on the first try from the embedded base model, at the shipped defaults.

The completion prompt's worked question/answer frame is what makes the 270M base
model answer these (without it, Tokyo and Shakespeare came in 2 of 5 runs).
``benchmarks/first_answer.py`` measures the rate over random seeds.
"""

from __future__ import annotations

import math

import numpy as np

from ggufllm import LLMService, Turn
from ggufllm.engine.prompt import _COMPLETION_STOPS

# (question, accepted words, the model's rate of right answers over seeds 1-20 at the
# defaults; docs/cli.md, "First answers")
QUESTIONS = [
    ("What is the capital of France?", ("Paris",), 19 / 20),
    ("What is the capital of Japan?", ("Tokyo",), 19 / 20),
    ("Who painted the Mona Lisa?", ("Leonardo", "Vinci"), 18 / 20),
    ("Who wrote Hamlet?", ("Shakespeare",), 14 / 20),
]
SEEDS = range(2, 7)
# the accepted chance that a CPU's draws fall short although the model keeps its rates
RISK = 1e-3


def needed(rates: list[float], n: int, risk: float) -> int:
    """The most right answers out of ``n`` draws per rate that the rates reach in all but
    ``risk`` of runs (the lower tail of the sum of the binomials)."""
    dist = np.array([1.0])
    for p in rates:
        dist = np.convolve(dist, [math.comb(n, k) * p**k * (1 - p) ** (n - k)
                                  for k in range(n + 1)])
    return int(np.searchsorted(np.cumsum(dist), risk, side="right"))


def test_factual_questions_at_the_default_settings(service: LLMService):
    """Which seeds answer right is not a guarantee: a sampled token moves wherever a CPU's
    rounding moves a cumulative probability past the seed's draw. How many answer right is
    bounded by the model's rates: fewer than ``needed`` (13 of 20) has a chance under 1e-3,
    whereas the bare ``Question: ... Answer:`` frame (Paris 4, Tokyo 2, Leonardo 3,
    Shakespeare 2 of 5) falls short in three runs of four."""
    cfg = service.generation_config
    assert (cfg.temperature, cfg.top_p, cfg.top_k) == (0.7, 0.9, 50)  # the shipped defaults
    right, wrong = [], []
    for question, expected, _rate in QUESTIONS:
        for seed in SEEDS:
            # max_tokens only bounds a wrong, rambling answer (the shared fixture's window is 1024)
            answer = service.answer(question, seed=seed, max_tokens=64)
            (right if any(word in answer.text for word in expected) else wrong).append(answer)
    threshold = needed([rate for _, _, rate in QUESTIONS], len(SEEDS), RISK)
    assert threshold == 13  # the rates above; a change to them shows here
    assert len(right) >= threshold, [a.text for a in wrong]
    assert all(a.finish_reason == "stop" for a in right)  # short answers, ended by the stops


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
