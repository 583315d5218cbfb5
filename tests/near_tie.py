"""Checks that a greedy answer computed beside other requests leaves the one computed alone
only at a near tie.

llama.cpp's CPU kernels are not batch-invariant (README, "Exactness";
``benchmarks/batch_invariance.py``): the shape of a batch and where a sequence's
cells lie move a logit by up to ~1.4 here, enough to flip a near tie between two
tokens but never a clear choice. A wrong cache (cells of other tokens, positions
off by one) changes the answer at a clear choice, so the check can fail.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import llama_cpp.llama_cpp as lib

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from batch_invariance import Bare  # noqa: E402

# the largest logit gap batch shapes may bridge (measured shifts: up to 1.4)
TIE = 2.0


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (None: equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def tie_gap(bare: Bare, prompt: Sequence[int], alone: Sequence[int],
            together: Sequence[int]) -> float:
    """Logit of ``alone``'s token minus ``together``'s at their first difference, computed
    cold by bare llama.cpp on the prompt and the common prefix; 0.0 when one answer merely
    stopped earlier (a stop or end token there is checked the same way)."""
    i = first_difference(alone, together)
    if i is None or i >= len(alone) or i >= len(together):
        return 0.0
    tokens = list(prompt) + list(alone[:i])
    lib.llama_memory_clear(bare.mem, True)
    for start in range(0, len(tokens), 512):
        part = tokens[start:start + 512]
        bare.decode([(t, start + k, 0, start + k == len(tokens) - 1) for k, t in enumerate(part)])
    logits = bare.logits((len(tokens) - 1) % 512)
    return float(logits[alone[i]] - logits[together[i]])


def assert_equal_or_near_ties(model: str | Path,
                              cases: list[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                              label: str = "answers") -> list[float]:
    """Each case is (prompt tokens, answer alone, answer beside others): equal, or apart at a
    near tie. Prints and returns the gaps of those that differ."""
    gaps: list[float] = []
    bare = Bare(str(model), 1, 2048)
    try:
        for prompt, alone, together in cases:
            if list(alone) == list(together):
                continue
            gap = tie_gap(bare, prompt, alone, together)
            gaps.append(round(gap, 3))
            assert abs(gap) <= TIE, (alone, together, gap)
    finally:
        bare.close()
    print(f"{len(gaps)} of {len(cases)} {label} left the ones computed alone; gaps {gaps}")
    return gaps
