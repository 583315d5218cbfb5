"""What the engine's exactness rests on, checked with llama.cpp's bare C API.

A cached answer equals the cold one (tests/test_engine_cache.py) because the engine
feeds every token in the same batch, into the same cell, as a cold run does
(ggufllm/engine/slots.py); that holds only if llama.cpp's CPU kernels are
deterministic: the same batches into the same cells give bit-identical logits,
whatever the CPU. That is checked here. How the logits move when batches or cells
differ is the kernels' business, not a guarantee: it changes with the SIMD width and
the repacked weight layouts of each CPU, so it is measured in
``benchmarks/batch_invariance.py`` and tolerated by ``tests/near_tie.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from batch_invariance import PROMPTS, SPLIT_PROMPT, Bare, run, split_prompt  # noqa: E402

from .near_tie import cold_logits, rounding_noise, tie_gap  # noqa: E402


@pytest.fixture(scope="module")
def bare(default_gguf: Path) -> Iterator[Bare]:
    b = Bare(str(default_gguf), 4, 2048)
    yield b
    b.close()


def identical(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("mode", ["alone", "apart", "batched", "late"])
def test_the_same_batches_give_bit_identical_logits(bare, mode):
    """Each way the scheduler batches (one sequence; prompts apart, decode steps shared;
    everything in one batch; a prompt arriving mid-stream), run twice from an empty cache."""
    prompts = [bare.tokenize(p) for p in PROMPTS[:3]]
    first = run(bare, prompts, 6, mode)
    assert identical(first, run(bare, prompts, 6, mode))


def test_a_prompt_cut_the_same_way_gives_bit_identical_logits(bare):
    tokens = bare.tokenize(SPLIT_PROMPT)
    for cut in (0, 7, len(tokens) // 2):
        assert np.array_equal(split_prompt(bare, tokens, cut), split_prompt(bare, tokens, cut))


def test_the_near_tie_check_fails_at_a_clear_choice(bare):
    """tests/near_tie.py must be able to fail: the token the model rates lowest is no tie of
    the greedy one (a wrong cache leaves the lone answer at such a clear choice)."""
    prompt = bare.tokenize(PROMPTS[0])
    logits = cold_logits(bare, prompt)
    greedy, far = int(np.argmax(logits)), int(np.argmin(logits))
    assert tie_gap(bare, prompt, [greedy], [greedy]) == (0.0, 0.0)
    assert tie_gap(bare, prompt, [greedy, 5], [greedy, 5]) == (0.0, 0.0)
    assert tie_gap(bare, prompt, [greedy], [greedy, 5]) == (0.0, 0.0)  # one stopped earlier
    gap, tolerance = tie_gap(bare, prompt, [greedy], [far])
    assert gap == pytest.approx(float(logits[greedy] - logits[far]))
    assert gap > tolerance
    # the tolerance is twice the noise of the same tokens, measured again the same way
    assert tolerance == 2 * rounding_noise(bare, prompt)
