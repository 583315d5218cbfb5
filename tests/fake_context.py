"""A fake llama.cpp context for the stepper's unit tests: KV cells as sets of positions,
every ``decode`` recorded, and a "model" whose next token is the input token + 1.

It implements what :class:`ggufllm.engine.stepper.Stepper` and its
:class:`~ggufllm.engine.slots.SlotTable` use of a context (``StepContext``), a batch
(``StepBatch``) and a sampler (``StepSampler``); a real engine is tested elsewhere.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from typing import Any

from ggufllm.chunks import Chunk, FinishReason
from ggufllm.config import GenerationConfig
from ggufllm.engine.request import Request
from ggufllm.engine.slots import SlotTable
from ggufllm.engine.stepper import Stepper

STOP = 999  # the fake model's end-of-generation token


class FakeBatch:
    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, bool]] = []

    @property
    def n(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        self.rows = []

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        self.rows.append((token, pos, seq, logits))
        return len(self.rows) - 1

    def close(self) -> None:
        self.rows = []


class FakeContext:
    """KV cells per sequence; ``decode`` stores a batch's cells or returns 1 when the pool
    (``n_ctx`` cells in all) is full; ``codes`` scripts return codes of the next calls."""

    def __init__(self, n_ctx: int = 512, n_batch: int = 128) -> None:
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self.cells: defaultdict[int, set[int]] = defaultdict(set)
        self.decodes: list[list[tuple[int, int, int, bool]]] = []
        self.copies: list[tuple[int, int, int, int]] = []
        self.codes: deque[int] = deque()

    def used(self) -> int:
        return sum(len(c) for c in self.cells.values())

    def decode(self, batch: FakeBatch) -> int:
        self.decodes.append(list(batch.rows))
        if self.codes:
            rc = self.codes.popleft()
            if rc:
                return rc
        new = {(seq, pos) for _, pos, seq, _ in batch.rows if pos not in self.cells[seq]}
        if self.used() + len(new) > self.n_ctx:
            return 1
        for seq, pos in new:
            self.cells[seq].add(pos)
        return 0

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        self.cells[seq] = {p for p in self.cells[seq] if p < p0 or (p1 >= 0 and p >= p1)}
        return True

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.copies.append((src, dst, p0, p1))
        self.cells[dst] |= {p for p in self.cells[src] if p >= p0 and (p1 < 0 or p < p1)}

    def seq_pos_min(self, seq: int) -> int:
        return min(self.cells[seq], default=-1)

    def seq_pos_max(self, seq: int) -> int:
        return max(self.cells[seq], default=-1)

    def input_at(self, index: int) -> int:
        return self.decodes[-1][index][0]


class FakeSampler:
    """The fake model: the token after the one evaluated at the sampled row, + 1."""

    def __init__(self) -> None:
        self.accepted: list[int] = []
        self.closed = False

    def accept(self, tokens: Sequence[int]) -> None:
        self.accepted.extend(tokens)

    def sample(self, ctx: FakeContext, index: int) -> int:
        return ctx.input_at(index) + 1

    def close(self) -> None:
        self.closed = True


class FakeReader:
    """One chunk a token; ``STOP`` ends the answer."""

    def feed(self, token: int) -> tuple[list[Chunk], FinishReason | None]:
        if token == STOP:
            return [], "stop"
        return [Chunk(f"<{token}>", token_ids=(token,))], None

    def flush(self, finish: FinishReason) -> list[Chunk]:
        return []


class Collected:
    """A request's sink: the chunks it got, or the error."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.error: BaseException | None = None

    def __call__(self, item: Any) -> None:
        if isinstance(item, BaseException):
            self.error = item
        else:
            self.chunks.extend(item)

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def finish(self) -> str | None:
        return self.chunks[-1].finish_reason if self.chunks else None


def make_stepper(*, n_ctx: int = 512, n_batch: int = 128, n_slots: int = 2,
                 n_ctx_seq: int = 256, max_queue: int = 8, exact: bool = False
                 ) -> tuple[Stepper, FakeContext]:
    ctx = FakeContext(n_ctx, n_batch)
    slots = SlotTable(ctx, n_slots, n_swa=0, exact=exact)  # type: ignore[arg-type]
    stepper = Stepper(ctx, slots, FakeBatch(), n_ctx_seq=n_ctx_seq, max_queue=max_queue,
                      make_sampler=lambda r: FakeSampler())
    return stepper, ctx


def request(prompt: Sequence[int], max_tokens: int = 8) -> tuple[Request, Collected]:
    sink = Collected()
    cfg = GenerationConfig(max_tokens=max_tokens, temperature=0.0)
    return Request(list(prompt), cfg, FakeReader(), sink), sink


def run(stepper: Stepper, limit: int = 10_000) -> int:
    """Steps until idle; returns how many steps ran."""
    for n in range(limit):
        if not stepper.step():
            return n
    raise AssertionError("the stepper never went idle")
