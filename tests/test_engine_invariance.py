"""What llama.cpp's CPU build guarantees about batching, measured with its bare C API.

The engine's design rests on these facts (see ggufllm/engine/slots.py): a
sequence's logits do not change when the single decode tokens of up to two other
sequences share its batch (they do from four rows on), and they do change when its
own prompt is cut into batches differently (hence prompt pages). These run with
fewer than 512 cells in use: past that, ggml-cpu splits a one-row attention over
the threads by cell index, so results also depend on where the cells lie.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from batch_invariance import PROMPTS, SPLIT_PROMPT, Bare, run, split_prompt  # noqa: E402

from .near_tie import TIE, tie_gap  # noqa: E402


@pytest.fixture(scope="module")
def bare(default_gguf: Path) -> Iterator[Bare]:
    b = Bare(str(default_gguf), 4, 2048)
    yield b
    b.close()


def test_decode_steps_shared_by_up_to_three_sequences_are_bit_identical(bare):
    prompts = [bare.tokenize(p) for p in PROMPTS[:4]]
    alone = run(bare, prompts[:1], 6, "alone")
    for n in (2, 3):
        together = run(bare, prompts[:n], 6, "apart")
        assert all(np.array_equal(a, b) for a, b in zip(alone, together, strict=True))
    # four rows: the repacked matmul takes its 4-row kernel, and the logits move
    four = run(bare, prompts, 6, "apart")
    assert not all(np.array_equal(a, b) for a, b in zip(alone, four, strict=True))


def test_cutting_a_prompt_into_other_batches_changes_its_logits(bare):
    tokens = bare.tokenize(SPLIT_PROMPT)
    whole = split_prompt(bare, tokens, 0)
    assert np.array_equal(whole, split_prompt(bare, tokens, 0))  # deterministic
    # not batch-invariant: why ggufllm evaluates prompts in fixed pages
    assert any(not np.array_equal(whole, split_prompt(bare, tokens, k))
               for k in range(1, len(tokens))), \
        "llama.cpp became batch-invariant here: prompt pages could go"


def test_the_near_tie_check_fails_at_a_clear_choice(bare):
    """tests/near_tie.py must be able to fail: a token far below the greedy one is no tie."""
    prompt = bare.tokenize(PROMPTS[0])
    logits = run(bare, [prompt], 1, "alone")[0]
    order = np.argsort(logits)
    greedy, far = int(order[-1]), int(order[-50])
    assert tie_gap(bare, prompt, [greedy], [greedy]) == 0.0
    assert tie_gap(bare, prompt, [greedy, 5], [greedy, 5]) == 0.0
    assert tie_gap(bare, prompt, [greedy], [far]) > TIE
