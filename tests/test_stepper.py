"""The stepper's scheduling policy against a fake context (tests/fake_context.py), in
milliseconds: pages, admission, states, slot choice, prefix sharing, eviction,
cancellation, the window edge, queue bounds and decode failures. The same policy runs
on the real engine in test_engine_scheduler.py, test_engine_cache.py and the server tests."""

from __future__ import annotations

import pytest

from ggufllm.engine.request import RequestState
from ggufllm.engine.slots import PAGE
from ggufllm.errors import DecodeFailedError, EngineFailedError, ServerBusyError

from .fake_context import STOP, make_stepper, request, run

S = RequestState


def test_a_request_alone_is_evaluated_in_pages_then_one_token_a_step():
    stepper, ctx = make_stepper()
    r, sink = request(range(1, 151), max_tokens=5)
    stepper.insert(r)
    assert r.state is S.WAITING
    run(stepper)
    sizes = [len(d) for d in ctx.decodes]
    # pages from multiples of PAGE, one llama_decode each, then decode steps of one row
    assert sizes == [PAGE, PAGE, 150 - 2 * PAGE, 1, 1, 1, 1]
    assert [row[1] for row in ctx.decodes[2]] == list(range(2 * PAGE, 150))
    # only the prompt's last token asks for logits
    assert [row[3] for d in ctx.decodes[:3] for row in d].count(True) == 1
    assert sink.tokens == [151, 152, 153, 154, 155]  # the fake model: input + 1
    assert sink.finish == "length" and r.state is S.FINISHED and r.slot is None
    timings = sink.chunks[-1].timings
    assert timings.n_prompt == 150 and timings.n_generated == 5 and timings.n_cached == 0
    assert stepper.tokens_evaluated == 150 and not stepper.active


def test_states_follow_the_request():
    stepper, _ = make_stepper(n_batch=64)
    r, sink = request(range(1, 101), max_tokens=3)
    stepper.insert(r)
    seen = [r.state]
    while stepper.step():
        seen.append(r.state)
    assert seen[0] is S.WAITING
    assert S.PREFILLING in seen and S.GENERATING in seen and seen[-1] is S.FINISHED
    order = [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] is not s]
    assert order == [S.WAITING, S.PREFILLING, S.GENERATING, S.FINISHED]
    assert sink.finish == "length"


def test_a_stop_token_ends_the_answer_at_the_first_token():
    stepper, _ = make_stepper()
    r, sink = request([STOP - 1], max_tokens=50)
    stepper.insert(r)
    run(stepper)
    assert sink.finish == "stop" and sink.tokens == [] and r.state is S.FINISHED


def test_requests_arriving_together_share_one_decode():
    stepper, ctx = make_stepper(n_batch=256, n_slots=4)
    reqs = [request([10 * k + i for i in range(1, 41)], max_tokens=4) for k in range(4)]
    for r, _ in reqs:
        stepper.insert(r)
    run(stepper)
    assert len(ctx.decodes[0]) == 4 * 40  # four prompts in one call, arrival order
    assert [row[2] for row in ctx.decodes[0][::40]] == [0, 1, 2, 3]
    assert all(len(d) == 4 for d in ctx.decodes[1:4])  # then one row each, together
    for _, sink in reqs:
        assert sink.finish == "length" and len(sink.tokens) == 4


def test_a_prompt_page_rides_with_the_decode_rows():
    stepper, ctx = make_stepper(n_batch=128, n_slots=2)
    a, sink_a = request(range(1, 11), max_tokens=20)
    stepper.insert(a)
    stepper.step()
    stepper.step()
    assert a.state is S.GENERATING
    b, sink_b = request(range(100, 200), max_tokens=2)
    stepper.insert(b)
    stepper.step()
    last = ctx.decodes[-1]
    # B's whole pages fit beside A's row: one call holds both
    assert {row[2] for row in last} == {0, 1} and len(last) == 1 + PAGE + (100 - PAGE)
    run(stepper)
    assert sink_a.finish == sink_b.finish == "length"


def test_admission_reserves_each_request_at_its_full_budget():
    # a pool of 256 cells: two requests of 100 + 100 cannot run together
    stepper, ctx = make_stepper(n_ctx=256, n_slots=2, n_ctx_seq=256)
    a, sink_a = request(range(1, 101), max_tokens=100)
    b, sink_b = request(range(1000, 1100), max_tokens=100)
    stepper.insert(a)
    stepper.insert(b)
    stepper.step()
    assert a.state is not S.WAITING and b.state is S.WAITING
    while a.state is not S.FINISHED:
        stepper.step()
        assert b.state is S.WAITING or a.state is S.FINISHED
    run(stepper)
    assert sink_a.finish == sink_b.finish == "length"
    assert all({row[2] for row in d} in ({0}, {1}) for d in ctx.decodes)  # never together


def test_a_follow_up_reuses_the_cached_prefix_in_the_same_slot():
    stepper, ctx = make_stepper(n_slots=2)
    doc = list(range(1, 201))
    a, _ = request(doc + [500, 501], max_tokens=3)
    stepper.insert(a)
    run(stepper)
    n_before = stepper.tokens_evaluated
    b, sink_b = request(doc + [600, 601], max_tokens=3)
    stepper.insert(b)
    run(stepper)
    assert sink_b.chunks[-1].timings.n_cached == 200  # fast: any matching prefix
    assert stepper.tokens_evaluated - n_before == 2
    assert {row[2] for d in ctx.decodes for row in d} == {0}  # the same slot


def test_exact_reuse_keeps_only_whole_pages():
    stepper, _ = make_stepper(n_slots=1, exact=True)
    doc = list(range(1, 201))
    a, _ = request(doc + [500], max_tokens=2)
    stepper.insert(a)
    run(stepper)
    b, sink_b = request(doc + [600], max_tokens=2)
    stepper.insert(b)
    run(stepper)
    assert sink_b.chunks[-1].timings.n_cached == 3 * PAGE  # 192 of the 200 shared tokens


def test_a_running_request_shares_its_prefix_with_a_new_one():
    stepper, ctx = make_stepper(n_slots=2)
    doc = list(range(1, 201))
    a, sink_a = request(doc + [500], max_tokens=30)
    stepper.insert(a)
    for _ in range(6):
        stepper.step()
    assert a.state is S.GENERATING
    b, sink_b = request(doc + [600], max_tokens=3)
    stepper.insert(b)
    run(stepper)
    assert ctx.copies and ctx.copies[0][:2] == (0, 1)  # llama_memory_seq_cp(0 -> 1)
    assert sink_b.chunks[-1].timings.n_cached == 200
    assert sink_a.finish == sink_b.finish == "length"


def test_a_full_pool_evicts_an_idle_slot_and_retries():
    stepper, ctx = make_stepper(n_ctx=300, n_slots=2, n_ctx_seq=300)
    a, _ = request(range(1, 201), max_tokens=2)
    stepper.insert(a)
    run(stepper)
    assert len(ctx.cells[0]) > 200
    b, sink_b = request(range(1000, 1200), max_tokens=2)  # no shared prefix: the other slot
    stepper.insert(b)
    run(stepper)
    assert sink_b.finish == "length" and sink_b.error is None
    assert not ctx.cells[0]  # the idle slot's cells were dropped to make room
    assert stepper.slots.slots[0].tokens == []


def test_cancelling_a_waiting_request_ends_it_without_a_slot_or_a_decode():
    stepper, ctx = make_stepper(n_slots=1)
    a, _ = request(range(1, 50), max_tokens=50)
    b, sink_b = request(range(100, 150), max_tokens=5)
    stepper.insert(a)
    stepper.insert(b)
    stepper.step()
    stepper.cancel(b)
    stepper.step()
    assert sink_b.finish == "cancelled" and b.state is S.FINISHED
    assert sink_b.chunks[-1].timings.prompt_s == 0.0
    assert not any(row[0] >= 100 and row[0] < 150 for d in ctx.decodes for row in d
                   if row[2] == 0 and row[1] < 49)


def test_cancelling_a_running_request_frees_its_slot_at_the_next_step():
    stepper, _ = make_stepper(n_slots=1)
    a, sink_a = request(range(1, 50), max_tokens=500)
    stepper.insert(a)
    for _ in range(3):
        stepper.step()
    stepper.cancel(a)
    assert stepper.step() is False
    assert sink_a.finish == "cancelled" and a.state is S.FINISHED
    assert not stepper.slots.slots[0].busy and stepper.slots.slots[0].tokens


def test_the_window_edge_ends_an_answer_as_length():
    stepper, _ = make_stepper(n_ctx_seq=64)
    r, sink = request(range(1, 61), max_tokens=4)
    stepper.insert(r)
    run(stepper)
    assert sink.finish == "length" and len(sink.tokens) == 4
    assert len(stepper.slots.slots[0].tokens) <= 64


def test_the_queue_bound_refuses_one_more():
    stepper, _ = make_stepper(n_slots=1, max_queue=1)
    first, _ = request([1, 2, 3])
    stepper.insert(first)  # a free slot takes it: not queued
    second, _ = request([4, 5, 6])
    stepper.insert(second)  # queued
    third, _ = request([7, 8, 9])
    with pytest.raises(ServerBusyError):
        stepper.insert(third)
    stepper.cancel(second)  # a cancelled request no longer counts
    stepper.insert(third)
    assert stepper.n_waiting() == 2  # first and third: the step has not run


def test_a_failed_decode_fails_the_requests_in_its_batch_and_drops_their_cells():
    stepper, ctx = make_stepper()
    r, sink = request(range(1, 101), max_tokens=5)
    stepper.insert(r)
    ctx.codes.extend([0, -3])  # the second page's call fails
    run(stepper)
    assert isinstance(sink.error, DecodeFailedError) and r.state is S.FINISHED
    assert stepper.slots.slots[0].tokens == list(range(1, PAGE + 1))
    assert ctx.cells[0] == set(range(PAGE))
    # the slot works again
    r2, sink2 = request(range(1, 101), max_tokens=2)
    stepper.insert(r2)
    run(stepper)
    assert sink2.finish == "length" and sink2.chunks[-1].timings.n_cached == PAGE


def test_out_of_cells_fails_only_the_newest_request():
    stepper, ctx = make_stepper(n_slots=2)
    a, sink_a = request(range(1, 11), max_tokens=6)
    stepper.insert(a)
    stepper.step()
    b, sink_b = request(range(100, 110), max_tokens=6)
    stepper.insert(b)
    ctx.codes.append(1)  # full, and no idle slot to evict
    run(stepper)
    assert isinstance(sink_b.error, DecodeFailedError) and sink_a.finish == "length"


def test_end_all_cancels_or_delivers_the_failure():
    stepper, _ = make_stepper(n_slots=1)
    a, sink_a = request(range(1, 20), max_tokens=50)
    b, sink_b = request(range(30, 40), max_tokens=5)
    stepper.insert(a)
    stepper.insert(b)
    stepper.step()
    stepper.end_all(None)
    assert sink_a.finish == sink_b.finish == "cancelled"
    c, sink_c = request(range(1, 20), max_tokens=50)
    stepper.insert(c)
    stepper.step()
    failure = EngineFailedError("boom")
    stepper.end_all(failure)
    assert sink_c.error is failure and c.state is S.FINISHED and not stepper.active


def test_a_new_document_keeps_the_other_documents_slot():
    # the same instructions, then another document: an empty slot takes it (the shared
    # instructions copied in), and the first document's follow-up still finds it whole
    stepper, ctx = make_stepper(n_slots=2)
    header = list(range(1, 41))
    doc_a, doc_b = list(range(100, 300)), list(range(1000, 1200))
    for prompt in (header + doc_a + [7], header + doc_b + [8]):
        r, _ = request(prompt, max_tokens=2)
        stepper.insert(r)
        run(stepper)
    assert ctx.copies == [(0, 1, 0, 40)]  # the header, shared by a copy
    follow_up, sink = request(header + doc_a + [9], max_tokens=2)
    stepper.insert(follow_up)
    run(stepper)
    assert sink.chunks[-1].timings.n_cached == 240
