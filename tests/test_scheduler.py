"""Scheduling policy without a model: the scheduler over a SlotCache whose KV
memory is the recording fake of tests/test_slots.py.  Each case states the
running set and asserts the exact plan (who, from which input, how many,
which rows are sampled) and what the slots hold after the update."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.engine.requests import CompletionOptions
from runner.engine.scheduler import Scheduler
from runner.engine.sequence import Sequence
from runner.engine.slots import SlotCache

from test_slots import FakeKV


class _Handle:
    def __init__(self, rid: str) -> None:
        self.id = rid


def make(parallel=2, slot_ctx=64, n_batch=16, prefill_budget=4, **kv_opts):
    kv = FakeKV(**kv_opts)
    cache = SlotCache(kv, parallel, slot_ctx)
    sched = Scheduler(cache, n_batch=n_batch, slot_ctx=slot_ctx, prefill_budget=prefill_budget,
                      lock=threading.Lock())
    return sched, cache, kv


def seq(rid: str, prompt, **options) -> Sequence:
    return Sequence(handle=_Handle(rid), options=CompletionOptions.from_dict(options).validate(),
                    inputs=list(prompt), spans=[], t_tokenize=0.0, t_queued=0.0)


def shape(plan):
    """(request, first input, count, generating, sampled) per plan entry."""
    return [(e.seq.id, e.start, e.n_inputs, e.generating, e.wants_output) for e in plan.entries]


def run_decode(sched: Scheduler, plan, kv: FakeKV, n_decoded=None) -> None:
    """What the executor and the engine do with a plan: write the KV for the
    decoded inputs, let the scheduler record them."""
    n = plan.n_inputs() if n_decoded is None else n_decoded
    done = 0
    for e in plan.entries:
        take = min(e.n_inputs, n - done)
        if take <= 0:
            break
        cells = kv.kv.setdefault(e.seq.slot.id, {})
        items = [e.seq.next_token] if e.generating else e.seq.inputs[e.start:e.start + take]
        for i, item in enumerate(items):
            cells[e.start + i] = item
        done += take
    sched.update(plan, n)


def test_admission_is_fifo_and_bounded_by_free_slots():
    sched, cache, _ = make(parallel=2)
    a, b, c = seq("a", [1, 2, 3]), seq("b", [4, 5]), seq("c", [6])
    sched.waiting.extend([a, b, c])
    assert sched.admit(lambda: True) == [a, b]
    assert list(sched.waiting) == [c]
    assert {a.slot.id, b.slot.id} == {0, 1}
    assert sched.admit(lambda: True) == []


def test_admission_stops_when_not_accepting():
    sched, _, _ = make()
    sched.waiting.append(seq("a", [1]))
    assert sched.admit(lambda: False) == []
    assert len(sched.waiting) == 1


def test_prompts_fill_the_batch_then_generation_caps_prefill():
    sched, cache, kv = make(parallel=2, n_batch=16, prefill_budget=4)
    a = seq("a", range(10))
    sched.waiting.append(a)
    sched.admit(lambda: True)
    plan = sched.schedule()
    assert shape(plan) == [("a", 0, 10, False, True)]  # a whole prompt, last row sampled
    run_decode(sched, plan, kv)
    assert cache.slots[a.slot.id].inputs == list(range(10))
    a.next_token = 99
    b = seq("b", range(100, 120))
    sched.waiting.append(b)
    sched.admit(lambda: True)
    plan = sched.schedule()
    # a generates one token; b's prompt is capped at the budget while a generates
    assert shape(plan) == [("a", 10, 1, True, True), ("b", 0, 4, False, False)]
    run_decode(sched, plan, kv)
    assert a.next_token is None and cache.slots[a.slot.id].inputs == list(range(10)) + [99]
    assert b.n_sched == 4 and cache.slots[b.slot.id].inputs == list(range(100, 104))


def test_prefill_rotates_between_prompts():
    sched, _, _ = make(parallel=3, n_batch=4, prefill_budget=4)
    seqs = [seq(r, range(8)) for r in "abc"]
    sched.waiting.extend(seqs)
    sched.admit(lambda: True)
    firsts = []
    for _ in range(3):
        plan = sched.schedule()
        firsts.append(plan.entries[0].seq.id)
        sched.update(plan, 0)  # nothing decoded: the plan is scheduled again later
    assert firsts == ["a", "b", "c"]
    assert all(s.n_sched == 0 for s in seqs)


def test_steps_list_sequences_in_slot_order_whatever_the_arrival():
    """Rows go into the batch by ascending slot (= sequence id): with one KV
    stream per slot, llama.cpp decodes a batch whose ids are out of order in
    several passes over the weights (runner.engine.scheduler, "Batch order")."""
    sched, cache, kv = make(parallel=4, n_batch=64)
    held = [cache.acquire([100 * k + i for i in range(3)])[0] for k in range(4)]
    for k in (3, 1, 2, 0):   # least recently used first: 3, 1, 2, 0
        cache.release(held[k])
    seqs = [seq(r, [7, ord(r)]) for r in "abcd"]
    sched.waiting.extend(seqs)
    assert sched.admit(lambda: True) == seqs
    assert [s.slot.id for s in seqs] == [3, 1, 2, 0]
    plan = sched.schedule()
    assert [e.seq.slot.id for e in plan.entries] == [0, 1, 2, 3]
    run_decode(sched, plan, kv)
    for s in seqs:
        s.next_token = 9
    sched.remove(seqs[1])   # slot 1 ends; a new request takes it back
    sched.release(seqs[1])
    late = seq("e", [8, 8])
    sched.waiting.append(late)
    sched.admit(lambda: True)
    assert late.slot.id == 1
    plan = sched.schedule()
    # the prompt chunk goes between the generating rows of slots 0 and 2
    assert [(e.seq.slot.id, e.generating) for e in plan.entries] == [
        (0, True), (1, False), (2, True), (3, True)]


def test_halved_batch_rolls_back_the_rest():
    sched, cache, kv = make(parallel=2, n_batch=16, prefill_budget=16)
    a, b = seq("a", range(6)), seq("b", range(10, 16))
    sched.waiting.extend([a, b])
    sched.admit(lambda: True)
    plan = sched.schedule()
    assert shape(plan) == [("a", 0, 6, False, True), ("b", 0, 6, False, True)]
    run_decode(sched, plan, kv, n_decoded=8)  # the decode took 8 of 12 inputs
    assert shape(plan) == [("a", 0, 6, False, True), ("b", 0, 2, False, False)]
    assert b.n_sched == 2 and cache.slots[b.slot.id].inputs == [10, 11]
    plan = sched.schedule()
    assert shape(plan) == [("b", 2, 4, False, True)]


def test_a_full_slot_without_shift_ends_with_length():
    sched, cache, kv = make(parallel=1, slot_ctx=8, n_batch=8)
    a = seq("a", range(7), shift=False)
    sched.waiting.append(a)
    sched.admit(lambda: True)
    run_decode(sched, sched.schedule(), kv)
    a.next_token = 50
    run_decode(sched, sched.schedule(), kv)  # position 7: the slot's last cell
    a.next_token = 51
    plan = sched.schedule()
    assert plan.entries == [] and plan.ended == [(a, "length")]
    assert sched.active == []


def test_a_full_slot_with_shift_keeps_generating():
    sched, cache, kv = make(parallel=1, slot_ctx=8, n_batch=8)
    a = seq("a", range(8 - 1), num_keep=2)
    sched.waiting.append(a)
    sched.admit(lambda: True)
    run_decode(sched, sched.schedule(), kv)
    a.next_token = 50
    run_decode(sched, sched.schedule(), kv)
    a.next_token = 51
    plan = sched.schedule()
    assert plan.ended == []
    [entry] = plan.entries
    assert entry.generating and entry.start == len(cache.slots[0].inputs) < 8


def test_a_memory_that_cannot_shift_reprocesses_the_survivors():
    sched, cache, kv = make(parallel=1, slot_ctx=8, n_batch=8, shift_ok=False)
    a = seq("a", range(7), num_keep=2)
    sched.waiting.append(a)
    sched.admit(lambda: True)
    run_decode(sched, sched.schedule(), kv)
    a.next_token = 50
    run_decode(sched, sched.schedule(), kv)
    a.next_token = 51
    plan = sched.schedule()
    # the survivors and the pending token come back as a prompt
    [entry] = plan.entries
    assert not entry.generating and entry.wants_output
    assert a.inputs[-1] == 51 and a.next_token is None and a.generated == []


def test_flagged_and_cancelled():
    sched, _, _ = make(parallel=2)
    a, b, c = seq("a", [1]), seq("b", [2]), seq("c", [3])
    sched.waiting.extend([a, b, c])
    sched.admit(lambda: True)
    a.stop_hit = 0
    b.cancelled = True
    c.cancelled = True
    assert sched.flagged() == [(a, "stop"), (b, "cancelled")]
    assert sched.take_cancelled() == [c] and not sched.waiting


@pytest.mark.parametrize("error, kept", [(None, [1, 2, 3, 7]), ("failed", [])])
def test_release_keeps_prompt_and_returned_tokens(error, kept):
    sched, cache, kv = make(parallel=1)
    a = seq("a", [1, 2, 3])
    sched.waiting.append(a)
    sched.admit(lambda: True)
    run_decode(sched, sched.schedule(), kv)
    a.generated = [7, 8]
    a.next_token = 7
    run_decode(sched, sched.schedule(), kv)
    a.n_returned = 1
    a.error = error
    sched.remove(a)
    sched.release(a)
    assert cache.slots[0].inputs == kept and not cache.slots[0].in_use


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["arrive", "end", "step"]), st.integers(0, 7),
                          st.integers(1, 12)), max_size=40))
def test_every_plan_lists_its_rows_by_ascending_slot(ops):
    """Whatever arrives, ends and generates in whatever order, a plan's
    entries come in ascending slot ids (runner.engine.scheduler, "Batch order")."""
    sched, cache, kv = make(parallel=3, n_batch=24, prefill_budget=6)
    n = 0
    for op, k, length in ops:
        if op == "arrive":
            n += 1
            sched.waiting.append(seq(f"r{n}", [100 * n + i for i in range(length)]))
            sched.admit(lambda: True)
        elif op == "end" and sched.active:
            s = sched.active[k % len(sched.active)]
            sched.remove(s)
            sched.release(s)
            sched.admit(lambda: True)
        else:
            plan = sched.schedule()
            ids = [e.seq.slot.id for e in plan.entries]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            run_decode(sched, plan, kv)
            for e in plan.entries:
                if e.wants_output:
                    e.seq.next_token = 5000 + n   # sampled: the sequence generates next
        assert [s.slot.id for s in sched.active] == sorted(s.slot.id for s in sched.active)
