"""LoRA policy without a model: requests of different adapter sets never
share a decode, the turn rotates between sets, and a slot's prefix serves
only its own set.  The scheduler and slot cache run over the recording fake
KV of tests/test_slots.py; each case asserts exact plans and KV calls."""

from __future__ import annotations

import threading

import pytest

from runner.engine import lora
from runner.engine.requests import BadRequest, CompletionOptions
from runner.engine.scheduler import Scheduler
from runner.engine.slots import SlotCache

from test_scheduler import run_decode, seq, shape
from test_slots import FakeKV

A = (1.0, 0.0)   # adapter 0 at scale 1
B = (0.0, 1.0)   # adapter 1 at scale 1
BASE = (0.0, 0.0)


def make(parallel=4, slot_ctx=64, n_batch=16, prefill_budget=16, turn=2, base=(1.0, 1.0),
         policy="single"):
    kv = FakeKV()
    cache = SlotCache(kv, parallel, slot_ctx, policy, base_lora=base)
    sched = Scheduler(cache, n_batch=n_batch, slot_ctx=slot_ctx, prefill_budget=prefill_budget,
                      lock=threading.Lock(), lora_turn_steps=turn)
    return sched, cache, kv


def lseq(rid, prompt, key):
    s = seq(rid, prompt)
    s.lora = key
    return s


def step(sched, kv, token=7):
    """Plan, 'decode', and give every sampled entry a next token."""
    plan = sched.schedule()
    run_decode(sched, plan, kv)
    for e in plan.entries:
        if e.wants_output:
            e.seq.next_token = token
    return plan


# -- the option ----------------------------------------------------------

@pytest.mark.parametrize("value, n, key", [
    (None, 2, (1.0, 1.0)),                       # no option: the load's default
    ([], 2, (1.0, 1.0)),                         # empty: the default too (llama-server)
    ([{"id": 1, "scale": 0.5}], 2, (0.0, 0.5)),  # unlisted adapters: scale 0
    ([{"id": 0, "scale": -0.0}], 1, (0.0,)),     # -0.0 is 0.0: one key per set
    ([{"id": 0}], 1, (0.0,)),                    # scale defaults to 0, as llama-server
    ([{"id": 0, "scale": 2}], 1, (2.0,)),        # integers are scales
    ([{"id": 0, "scale": 0.1}], 1, (float.fromhex("0x1.99999ap-4"),)),  # as float32
    (None, 0, ()),
])
def test_resolve(value, n, key):
    options = CompletionOptions.from_dict({"lora": value})
    assert lora.resolve(options.lora, n) == key


@pytest.mark.parametrize("value, n, message", [
    ([{"id": 2, "scale": 1.0}], 2, "no adapter with id 2 is loaded (loaded: ids 0..1)"),
    ([{"id": 0, "scale": 1.0}], 0, "no adapter with id 0 is loaded (loaded: none)"),
    ([{"id": -1, "scale": 1.0}], 2, "no adapter with id -1"),
    ([{"id": 0, "scale": 1}, {"id": 0, "scale": 2}], 2, "adapter 0 is given twice"),
])
def test_resolve_refuses_ids_not_loaded(value, n, message):
    with pytest.raises(BadRequest, match="invalid option lora: " + message.replace("(", r"\(").replace(")", r"\)")):
        lora.resolve(CompletionOptions.from_dict({"lora": value}).lora, n)


@pytest.mark.parametrize("value, message", [
    ({"id": 0}, "must be a list"),
    ("0:1", "must be a list"),
    ([0.5], "item 0 must be a map"),
    ([{"scale": 1.0}], "item 0 needs an integer id"),
    ([{"id": "0", "scale": 1.0}], "item 0 needs an integer id"),
    ([{"id": True, "scale": 1.0}], "item 0 needs an integer id"),
    ([{"id": 0, "scale": "1"}], "scale must be a number"),
    ([{"id": 0, "scale": True}], "scale must be a number"),
    ([{"id": 0, "scale": float("nan")}], "scale must be finite"),
    ([{"id": 0, "scale": 1e300}], "scale must be finite"),
    ([{"id": 0, "scale": 1.0, "path": "x"}], "unknown field"),
    ([{"id": i, "scale": 1.0} for i in range(65)], "at most 64 entries"),
])
def test_option_shape_is_checked(value, message):
    with pytest.raises(BadRequest, match="invalid option lora: .*" + message):
        CompletionOptions.from_dict({"lora": value})


def test_describe():
    assert lora.describe(()) == "base"
    assert lora.describe((0.0, 0.0)) == "base"
    assert lora.describe((1.0, 0.0, 0.5)) == "0:1, 2:0.5"


# -- scheduling ----------------------------------------------------------

def test_one_set_per_decode_and_turns_rotate():
    """Two sets, turn of 2 steps: A, A, B, B, A, ... and no plan mixes them."""
    sched, cache, kv = make(turn=2)
    a1, a2, b1 = lseq("a1", [1, 2], A), lseq("a2", [3, 4], A), lseq("b1", [5, 6], B)
    sched.waiting.extend([a1, b1, a2])
    assert sched.admit(lambda: True) == [a1, b1, a2]
    sched.lora = A  # the turn starts with A (as after an A-only stretch)
    plans = [step(sched, kv) for _ in range(6)]
    assert [p.lora for p in plans] == [A, A, B, B, A, A]
    for p in plans:
        assert {e.seq.lora for e in p.entries} == {p.lora}
    assert shape(plans[0]) == [("a1", 0, 2, False, True), ("a2", 0, 2, False, True)]
    assert shape(plans[1]) == [("a1", 2, 1, True, True), ("a2", 2, 1, True, True)]
    assert shape(plans[2]) == [("b1", 0, 2, False, True)]
    assert shape(plans[3]) == [("b1", 2, 1, True, True)]
    assert shape(plans[4]) == [("a1", 3, 1, True, True), ("a2", 3, 1, True, True)]


def test_a_set_alone_keeps_the_turn():
    sched, cache, kv = make(turn=1)
    a = lseq("a", [1, 2], A)
    sched.waiting.append(a)
    sched.admit(lambda: True)
    assert [step(sched, kv).lora for _ in range(4)] == [A] * 4


def test_a_set_without_work_passes_the_turn_at_once():
    """B ends mid-turn: the next step is A's, not an empty plan."""
    sched, cache, kv = make(turn=8)
    a, b = lseq("a", [1, 2], A), lseq("b", [3, 4], B)
    sched.waiting.extend([a, b])
    sched.admit(lambda: True)
    sched.lora = B
    assert shape(step(sched, kv)) == [("b", 0, 2, False, True)]
    sched.remove(b)
    plan = step(sched, kv)
    assert plan.lora == A and shape(plan) == [("a", 0, 2, False, True)]


def test_three_sets_rotate_in_key_order():
    sched, cache, kv = make(turn=1)
    c = (0.5, 0.5)
    for rid, key in (("a", A), ("b", B), ("c", c)):
        sched.waiting.append(lseq(rid, [1, 2], key))
    sched.admit(lambda: True)
    sched.lora = BASE
    # sorted keys: B (0,1) < c (0.5,0.5) < A (1,0); after BASE comes B
    assert [step(sched, kv).lora for _ in range(6)] == [B, c, A, B, c, A]


def test_media_steps_follow_the_turn():
    """schedule_media takes only sequences of the set whose turn it is."""
    sched, cache, kv = make(turn=1)
    a = lseq("a", [1, 2], A)
    sched.waiting.append(a)
    sched.admit(lambda: True)
    sched.lora = B
    assert sched.schedule_media() is None  # (a has no media; and it is not B's turn)
    assert step(sched, kv).lora == A


# -- the slot cache ------------------------------------------------------

def test_a_prefix_serves_only_its_own_set():
    sched, cache, kv = make(parallel=1)
    slot, n = cache.acquire([1, 2, 3, 4], A)
    assert n == 0
    kv.decode(cache, slot, [1, 2, 3, 4])
    cache.release(slot)
    kv.calls.clear()
    # Another set: nothing reused, the slot is cleared first.
    slot, n = cache.acquire([1, 2, 3, 4, 5], B)
    assert (n, slot.inputs, slot.lora, kv.calls) == (0, [], B, [("rm", 0, 0, -1)])
    kv.decode(cache, slot, [1, 2, 3, 4, 5])
    cache.release(slot)
    kv.calls.clear()
    # The same set again: its prefix is reused.
    slot, n = cache.acquire([1, 2, 3, 4, 5, 6], B)
    assert (n, slot.lora, kv.calls) == (5, B, [])


def test_single_policy_prefers_a_slot_of_the_same_set():
    _, cache, kv = make(parallel=2)
    s0, _ = cache.acquire([1, 2, 3], A)
    kv.decode(cache, s0, [1, 2, 3])
    s1, _ = cache.acquire([1, 2, 3], B)
    kv.decode(cache, s1, [1, 2, 3])
    cache.release(s0)
    cache.release(s1)
    slot, n = cache.acquire([1, 2, 3, 4], B)
    assert (slot.id, n) == (1, 3)
    cache.release(slot)
    slot, n = cache.acquire([1, 2, 3, 4], A)
    assert (slot.id, n) == (0, 3)


def test_multi_policy_forks_only_from_the_same_set():
    _, cache, kv = make(parallel=3, policy="multi")
    s0, _ = cache.acquire([1, 2, 3, 4], A)
    kv.decode(cache, s0, [1, 2, 3, 4])
    kv.calls.clear()
    # B finds A's prefix but may not fork it: an empty slot, nothing cached.
    s1, n = cache.acquire([1, 2, 3, 4, 5], B)
    assert (s1.id, n, kv.calls) == (1, 0, [])
    # A forks its own prefix into the last free slot.
    s2, n = cache.acquire([1, 2, 3, 9], A)
    assert (s2.id, n) == (2, 3)
    assert kv.calls == [("cp", 0, 2, 0, 3)]


def test_uncached_slots_and_restored_files_take_the_default_set():
    _, cache, kv = make(parallel=1, base=(1.0, 1.0))
    slot, _ = cache.acquire([1, 2], A)
    kv.decode(cache, slot, [1, 2])
    cache.release(slot)
    slot = cache.acquire_uncached()
    assert slot.lora == (1.0, 1.0) and slot.inputs == []
    cache.release(slot)
    slot, _ = cache.acquire([5, 6], B)
    cache.release(slot)
    assert cache.put(slot, [1, 2, 3], lambda: True)
    assert slot.lora == (1.0, 1.0)


def test_the_host_tier_keeps_only_the_default_set():
    """A slot of another set is dropped, not saved; a default-set slot is
    saved and restored for a default-set prompt only."""
    from runner.engine.hostcache import HostCache
    from test_hostcache import FakeState

    kv = FakeKV()
    host = HostCache(FakeState(kv), 1 << 20, min_inputs=1, eval_s_per_input=1.0, clock=lambda: 0.0)
    cache = SlotCache(kv, 1, 64, host=host, base_lora=BASE)

    def serve(prompt, key):
        slot, n = cache.acquire(prompt, key)
        kv.decode(cache, slot, prompt[n:])
        cache.release(slot)
        return n

    assert serve(list(range(8)), A) == 0
    assert serve(list(range(20, 28)), BASE) == 0  # A's slot is reused: not saved
    assert len(host) == 0
    assert serve(list(range(40, 48)), B) == 0     # the BASE slot is saved first
    assert [e.inputs for e in host.entries()] == [tuple(range(20, 28))]
    assert serve(list(range(20, 30)), A) == 0     # A may not restore BASE's state
    assert serve(list(range(20, 30)), BASE) == 8  # BASE does


# -- the turn length from the measured switch cost ---------------------

def test_switch_cost_sets_the_turn():
    cost = lora.SwitchCost(min_steps=8, max_steps=64, overhead=0.1, weight=1.0)
    assert cost.turn_steps() == 8                 # nothing measured
    cost.note(0.010, switched=True)               # a switch before any plain decode: not used
    assert cost.extra_s is None and cost.turn_steps() == 8
    cost.note(0.010, switched=False)              # plain decodes: 10 ms
    assert cost.turn_steps() == 8                 # no switch measured yet
    cost.note(0.012, switched=True)               # +2 ms: 2 steps would do; at least 8
    assert cost.turn_steps() == 8
    cost.note(0.030, switched=True)               # +20 ms: 20 steps keep it at 10%
    assert cost.turn_steps() == 20
    cost.note(0.500, switched=True)               # +490 ms: capped
    assert cost.turn_steps() == 64
    cost.note(0.005, switched=True)               # faster than a plain decode: extra 0
    assert cost.extra_s == 0.0 and cost.turn_steps() == 8


def test_switch_cost_averages():
    cost = lora.SwitchCost(weight=0.5)
    for seconds in (0.010, 0.020):
        cost.note(seconds, switched=False)
    assert cost.step_s == pytest.approx(0.015)
    cost.note(0.035, switched=True)
    cost.note(0.025, switched=True)
    assert cost.extra_s == pytest.approx(0.015)   # 0.020, then halfway to 0.010
    assert cost.turn_steps() == 10
