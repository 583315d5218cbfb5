"""Checks that a greedy answer computed another way leaves the one computed alone only at a
near tie, with a tolerance derived on the CPU that runs the check.

"Another way": beside other requests (their rows share its batches), or through cached cells
that lie elsewhere in the pool than a cold run puts them. The answer then reads the same
tokens at the same positions through the same weights; only the order in which llama.cpp's
kernels add up their sums differs (docs/python.md, "Exactness"; ``benchmarks/batch_invariance.py``),
and its logits differ from the lone ones by rounding alone.

The tolerance follows from that. Let ℓ be the logits bare llama.cpp computes cold for the
prompt and the common prefix of both answers, ℓA and ℓB those of the lone and the other run
at their first difference, where A took a = argmax ℓA and B took b = argmax ℓB. Then

    ℓ[a] - ℓ[b] <= (ℓ[a] - ℓB[a]) + (ℓB[b] - ℓ[b]) <= 2·max|ℓ - ℓB|, and
    ℓ[a] - ℓ[b] >= (ℓ[a] - ℓA[a]) + (ℓA[b] - ℓ[b]) >= -2·max|ℓ - ℓA|,

so |gap| <= 2·noise, where noise bounds how far rounding moves any logit. The runs' own ℓA
and ℓB are not at hand, so :func:`rounding_noise` provokes the same kind of change on the
same tokens: it evaluates them again in other batch shapes and cell places and takes the
largest change of any logit. That is an estimate of the noise, computed for the CPU, the
model and the position at hand, not a number read off one machine (it ranges from ~0.1 on
the tiny gpt-oss fixture to ~1 on Gemma 3 270M); a run whose rounding exceeded every
provoked one would fail with both numbers in the message. A wrong cache (cells of other
tokens, positions off by one) changes what the model reads and leaves the lone answer
where it had a clear choice, far beyond rounding; ``tests/test_engine_invariance.py``
shows the check failing there.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import llama_cpp.llama_cpp as lib
import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from batch_invariance import Bare  # noqa: E402

BATCH = 512  # Bare's batch: the reference evaluation cuts the tokens every 512
PAGE = 64  # the engine's prompt page (ggufllm.engine.slots.PAGE)
# rows of another sequence put before the tokens in one noise variant: no multiple of a SIMD
# width, of a matmul kernel's row group, of an attention tile (64 rows or cells) or of
# llama.cpp's 256-cell padding, so every one of those groupings sees the tokens elsewhere
SHIFT = 37
# appended to an answer's tokens when it ended with an end-of-generation token (finish reason
# "stop"), so that an answer that stopped where the other went on is checked like any other
# difference: the gap is then between the other's token and the likeliest end token
END = -1


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (None: equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _evaluate(bare: Bare, tokens: Sequence[int], page: int) -> np.ndarray:
    """The last token's logits, ``tokens`` fed in batches cut at multiples of ``page``."""
    lib.llama_memory_clear(bare.mem, True)
    last = len(tokens) - 1
    for start in range(0, len(tokens), page):
        part = tokens[start:start + page]
        bare.decode([(t, start + k, 0, start + k == last) for k, t in enumerate(part)])
    return bare.logits(last % page)


def cold_logits(bare: Bare, tokens: Sequence[int]) -> np.ndarray:
    """The reference: ``tokens`` in batches of 512 into an empty cache; the last one's logits."""
    return _evaluate(bare, tokens, BATCH)


def _last_alone(bare: Bare, tokens: Sequence[int]) -> np.ndarray:
    """``tokens`` as the reference feeds them, but the last one decoded on its own."""
    lib.llama_memory_clear(bare.mem, True)
    n = len(tokens)
    for start in range(0, n - 1, BATCH):
        part = tokens[start:min(start + BATCH, n - 1)]
        bare.decode([(t, start + k, 0, False) for k, t in enumerate(part)])
    bare.decode([(tokens[-1], n - 1, 0, True)])
    return bare.logits(0)


def _beside_another(bare: Bare, tokens: Sequence[int]) -> np.ndarray:
    """``tokens`` in batches that begin with ``SHIFT`` rows of another sequence."""
    lib.llama_memory_clear(bare.mem, True)
    others = [(tokens[0], k, 1, False) for k in range(SHIFT)]
    last = len(tokens) - 1
    step = BATCH - SHIFT
    for start in range(0, len(tokens), step):
        part = tokens[start:start + step]
        rows = [(t, start + k, 0, start + k == last) for k, t in enumerate(part)]
        bare.decode(others + rows if start == 0 else rows)
    return bare.logits(SHIFT + last if last < step else last % step)


def rounding_noise(bare: Bare, tokens: Sequence[int], reference: np.ndarray | None = None
                   ) -> float:
    """How far rounding alone moves a logit after ``tokens`` on this CPU: the largest change
    of any logit against :func:`cold_logits` when the same tokens are evaluated

    - with their last token decoded alone (the one-row kernels of every decode step),
    - beside rows of another sequence (a prompt page shared with another request: every row
      sits elsewhere in its batch, the batch has other row counts, and the cells lie
      elsewhere in the pool),
    - in the engine's 64-token pages (other batch cuts).

    ``bare`` needs two sequences.
    """
    ref = cold_logits(bare, tokens) if reference is None else reference
    variants = [_last_alone(bare, tokens), _beside_another(bare, tokens)]
    if len(tokens) > PAGE:
        variants.append(_evaluate(bare, tokens, PAGE))
    return max(float(np.max(np.abs(v - ref))) for v in variants)


def tie_gap(bare: Bare, prompt: Sequence[int], alone: Sequence[int],
            together: Sequence[int]) -> tuple[float, float]:
    """(gap, tolerance) at the first difference of ``alone`` and ``together``: the cold logit
    of ``alone``'s token minus ``together``'s, and 2 x :func:`rounding_noise` there (see the
    module docstring); (0.0, 0.0) when they are equal or one was cut earlier (by its token
    budget). An answer that ended by an end token carries :data:`END`, checked like a token."""
    i = first_difference(alone, together)
    if i is None or i >= len(alone) or i >= len(together):
        return 0.0, 0.0
    tokens = list(prompt) + list(alone[:i])
    logits = cold_logits(bare, tokens)
    gap = float(_logit(bare, logits, alone[i]) - _logit(bare, logits, together[i]))
    return gap, 2 * rounding_noise(bare, tokens, logits)


def _logit(bare: Bare, logits: np.ndarray, token: int) -> float:
    """A token's logit; for :data:`END`, the likeliest end-of-generation token's."""
    if token != END:
        return float(logits[token])
    eog = [t for t in range(bare.n_vocab) if lib.llama_vocab_is_eog(bare.vocab, t)]
    return float(logits[eog].max())


def assert_equal_or_near_ties(model: str | Path,
                              cases: list[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                              label: str = "answers") -> list[float]:
    """Each case is (prompt tokens, answer alone, answer computed another way): equal, or
    apart where the cold gap between their tokens is within what rounding explains. Prints
    and returns the gaps of those that differ."""
    gaps: list[float] = []
    tolerances: list[float] = []
    differ = [case for case in cases if list(case[1]) != list(case[2])]
    bare = Bare(str(model), 2, 2048) if differ else None  # a load only where one is checked
    try:
        for prompt, alone, together in differ:
            gap, tolerance = tie_gap(bare, prompt, alone, together)
            gaps.append(round(gap, 3))
            tolerances.append(round(tolerance, 3))
            assert abs(gap) <= tolerance, (alone, together, gap, tolerance)
    finally:
        if bare is not None:
            bare.close()
    print(f"{len(gaps)} of {len(cases)} {label} left the ones computed alone; gaps {gaps}, "
          f"tolerances {tolerances}")
    return gaps
