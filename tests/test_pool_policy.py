"""The pool's policy (runner/process/pool_policy.py) with plain numbers: no process, no model."""

from __future__ import annotations

import pytest

from runner.process.pool_policy import PoolPolicy, Room

MiB = 1 << 20
UNKNOWN = Room(0, 0)  # discover said nothing: only the pool's own limits apply


def loaded(policy: PoolPolicy, *models: tuple[str, int, float]) -> PoolPolicy:
    """Models (name, MiB, last used) loaded and idle, in that order."""
    for name, mib, last_used in models:
        a = policy.admit(name, mib * MiB, UNKNOWN)
        assert a.kind == "load", a
        policy.start_load(name, mib * MiB, a.evict, last_used)
        policy.loaded(name, last_used)
    return policy


@pytest.mark.parametrize("need_mib, evict", [
    (100, ()),                    # 300 + 100 <= 400
    (150, ("b",)),                # the least recently used goes first (b at t=1)
    (250, ("b", "c")),            # then the next (c at t=2)
    (400, ("b", "c", "a")),       # everything
])
def test_budget_evicts_idle_runners_least_recently_used_first(need_mib, evict):
    policy = loaded(PoolPolicy(memory_budget=400 * MiB), ("a", 100, 3.0), ("b", 100, 1.0),
                    ("c", 100, 2.0))
    a = policy.admit("new", need_mib * MiB, UNKNOWN)
    assert (a.kind, a.evict) == ("load", evict)


@pytest.mark.parametrize("max_loaded, evict", [(4, ()), (3, ("b",)), (2, ("b", "c")), (1, ("b", "c", "a"))])
def test_max_loaded_evicts_least_recently_used(max_loaded, evict):
    policy = loaded(PoolPolicy(), ("a", 10, 3.0), ("b", 10, 1.0), ("c", 10, 2.0))
    policy.max_loaded = max_loaded
    a = policy.admit("new", 10 * MiB, UNKNOWN)
    assert (a.kind, a.evict) == ("load", evict)


def test_a_busy_runner_is_never_evicted_the_request_waits_for_it():
    policy = loaded(PoolPolicy(memory_budget=300 * MiB), ("a", 100, 1.0), ("b", 100, 2.0))
    policy.acquire("a")                                  # a is the LRU, but busy
    a = policy.admit("new", 150 * MiB, UNKNOWN)
    assert (a.kind, a.evict) == ("load", ("b",))         # b goes instead
    a = policy.admit("new", 250 * MiB, UNKNOWN)          # would need a's room too
    assert a.kind == "wait" and a.evict == ()
    assert "a (1 in flight)" in a.reason and "250.0 MiB" in a.reason
    policy.release("a", now=5.0, answered=True)
    a = policy.admit("new", 250 * MiB, UNKNOWN)
    assert (a.kind, a.evict) == ("load", ("b", "a"))       # a was used last now


def test_requests_for_the_runners_a_waiting_request_needs_wait_behind_it():
    policy = loaded(PoolPolicy(memory_budget=250 * MiB), ("a", 100, 1.0), ("b", 100, 2.0))
    policy.acquire("a")
    policy.acquire("b")
    a = policy.admit("new", 150 * MiB, UNKNOWN)
    assert (a.kind, a.drain) == ("wait", ("a",))     # a's room is enough: the LRU busy one
    assert policy.admit("new", 250 * MiB, UNKNOWN).drain == ("a", "b")
    policy.draining = set(a.drain)
    assert policy.admit("a", 100 * MiB, UNKNOWN).kind == "wait"   # no new lease on a
    assert policy.admit("b", 100 * MiB, UNKNOWN).kind == "use"
    policy.release("a", now=3.0, answered=True)
    assert policy.admit("new", 150 * MiB, UNKNOWN).evict == ("a",)


def test_a_loading_runner_is_never_evicted():
    policy = PoolPolicy(max_loaded=1)
    policy.start_load("a", 10 * MiB, (), 0.0)
    assert policy.admit("a", 10 * MiB, UNKNOWN).kind == "join"
    a = policy.admit("b", 10 * MiB, UNKNOWN)
    assert a.kind == "wait" and "a (loading)" in a.reason


def test_what_can_never_fit_is_refused_with_the_numbers():
    policy = loaded(PoolPolicy(memory_budget=300 * MiB), ("a", 100, 1.0))
    a = policy.admit("huge", 301 * MiB, UNKNOWN)
    assert a.kind == "refuse"
    assert a.reason == "huge needs 301.0 MiB, more than the pool's memory budget of 300.0 MiB"
    a = PoolPolicy().admit("huge", 9000 * MiB, Room(free=4000 * MiB, total=8000 * MiB, where="CUDA0"))
    assert a.kind == "refuse"
    assert a.reason == "huge needs 9000.0 MiB, more than the 8000.0 MiB that CUDA0 holds in all"


def test_free_memory_from_discover_counts_what_evictions_give_back():
    # 500 MiB free on the GPU now; a (200 MiB) and b (100 MiB) loaded.
    room = Room(free=500 * MiB, total=1000 * MiB, where="CUDA0")
    policy = loaded(PoolPolicy(), ("a", 200, 1.0), ("b", 100, 2.0))
    assert policy.admit("c", 500 * MiB, room).evict == ()
    assert policy.admit("c", 600 * MiB, room).evict == ("a",)
    assert policy.admit("c", 800 * MiB, room).evict == ("a", "b")
    a = policy.admit("c", 900 * MiB, room)   # under the total, but other processes hold the rest
    assert a.kind == "refuse" and "CUDA0 has 500.0 MiB free" in a.reason


def test_a_loading_runner_has_not_taken_its_memory_yet():
    room = Room(free=500 * MiB, total=1000 * MiB, where="CUDA0")
    policy = PoolPolicy()
    policy.start_load("a", 300 * MiB, (), 0.0)
    assert policy.admit("b", 200 * MiB, room).kind == "load"
    a = policy.admit("b", 300 * MiB, room)
    assert a.kind == "wait" and "200.0 MiB free on CUDA0" in a.reason


def test_unloading_memory_counts_until_the_process_is_gone():
    policy = loaded(PoolPolicy(memory_budget=200 * MiB), ("a", 150, 1.0))
    a = policy.admit("b", 100 * MiB, UNKNOWN)
    policy.start_load("b", 100 * MiB, a.evict, 2.0)
    assert a.evict == ("a",) and policy.unloading == {"a": 150 * MiB}
    assert policy.used() == 250 * MiB
    assert policy.admit("a", 150 * MiB, UNKNOWN).kind == "wait"   # a is still being unloaded
    policy.unloaded("a")
    policy.loaded("b", 3.0)
    assert (policy.admit("a", 150 * MiB, UNKNOWN).kind, policy.admit("a", 150 * MiB, UNKNOWN).evict) == \
        ("load", ("b",))


@pytest.mark.parametrize("keep_alive, own, at, expired", [
    (10.0, None, 10.9, ["b"]),            # b idle since 0.5, a since 1.0
    (10.0, None, 11.0, ["b", "a"]),       # least recently used first
    (10.0, 60.0, 11.0, ["b"]),            # a's own keep-alive (a request's) wins
    (None, None, 1e9, []),                # None: never
    (0.0, None, 1.0, ["b", "a"]),         # 0: as soon as idle
])
def test_keep_alive_expiry(keep_alive, own, at, expired):
    policy = loaded(PoolPolicy(keep_alive=keep_alive), ("a", 10, 1.0), ("b", 10, 0.5))
    if own is not None:
        policy.acquire("a", keep_alive=own)
        policy.release("a", now=1.0, answered=True)
    assert policy.expired(at) == expired


def test_busy_and_loading_runners_never_expire():
    policy = loaded(PoolPolicy(keep_alive=1.0), ("a", 10, 0.0))
    policy.start_load("b", 10 * MiB, (), 0.0)
    policy.acquire("a")
    assert policy.expired(100.0) == [] and policy.next_expiry() is None
    policy.release("a", now=50.0, answered=True)
    assert policy.next_expiry() == 51.0 and policy.expired(51.0) == ["a"]


def test_two_failures_in_a_row_are_reported_not_looped():
    policy = loaded(PoolPolicy(), ("a", 10, 0.0))
    assert policy.failure("a", "exit -9") is False          # the next request may start it again
    assert policy.admit("a", 10 * MiB, UNKNOWN).kind == "load"
    policy.start_load("a", 10 * MiB, (), 1.0)
    policy.loaded("a", 1.0)
    assert policy.failure("a", "exit -11") is True
    a = policy.admit("a", 10 * MiB, UNKNOWN)
    assert a.kind == "refuse"
    assert a.reason == ("a failed 2 times in a row (1: exit -9; 2: exit -11); "
                        "not starting it again until pool.reset('a')")
    policy.reset("a")
    assert policy.admit("a", 10 * MiB, UNKNOWN).kind == "load"


def test_an_answered_request_ends_the_row_of_failures():
    policy = loaded(PoolPolicy(), ("a", 10, 0.0))
    policy.failure("a", "exit -9")
    loaded(policy, ("a", 10, 1.0))
    policy.acquire("a")
    policy.release("a", now=2.0, answered=True)
    assert policy.failure("a", "exit -9") is False
    assert policy.crashes == {"a": ["exit -9"]}


def test_load_failures_count_as_failures():
    policy = PoolPolicy()
    policy.start_load("a", 10 * MiB, (), 0.0)
    assert policy.failure("a", "load failed: bad file") is False
    assert "a" not in policy.entries
    policy.start_load("a", 10 * MiB, (), 1.0)
    assert policy.failure("a", "load failed: bad file") is True


@pytest.mark.parametrize("kwargs", [{"max_loaded": 0}, {"memory_budget": 0}, {"keep_alive": -1}])
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(ValueError):
        PoolPolicy(**kwargs)


# -- invariants under any sequence of events ---------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MODELS = ["a", "b", "c", "d"]
OPS = st.lists(st.tuples(st.sampled_from(["request", "loaded", "finish", "unloaded", "die", "expire"]),
                         st.sampled_from(MODELS), st.integers(1, 6)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=OPS, max_loaded=st.sampled_from([None, 1, 2, 3]), budget=st.sampled_from([None, 5, 8, 12]),
       free=st.sampled_from([0, 6, 10]))
def test_invariants_hold_under_any_sequence(ops, max_loaded, budget, free):
    """Whatever happens: busy and loading runners are never evicted, the
    limits hold, and a request only waits when something will wake it."""
    policy = PoolPolicy(max_loaded=max_loaded, memory_budget=budget and budget * MiB, keep_alive=5.0)
    room = Room(free=free * MiB, total=free * MiB, where="DEV")
    for now, (op, model, size) in enumerate(ops):
        entry = policy.entries.get(model)
        if op == "request":
            a = policy.admit(model, size * MiB, room)
            if a.kind == "load":
                for m in a.evict:
                    e = policy.entries[m]
                    assert e.state == "ready" and e.in_flight == 0, (m, e)
                assert model not in policy.entries and model not in policy.unloading
                policy.start_load(model, size * MiB, a.evict, now)
            elif a.kind == "use":
                policy.acquire(model)
            elif a.kind == "wait":
                wakes = any(e.in_flight or e.state == "loading" for e in policy.entries.values())
                assert wakes or policy.unloading, a.reason
            elif a.kind == "refuse":
                assert a.reason
        elif op == "loaded":  # every load under way finishes
            for m in [m for m, e in policy.entries.items() if e.state == "loading"]:
                policy.loaded(m, now)
        elif op == "finish" and entry is not None and entry.in_flight:
            policy.release(model, now, answered=True)
        elif op == "unloaded":  # every unload under way finishes
            for m in list(policy.unloading):
                policy.unloaded(m)
        elif op == "die" and entry is not None:
            policy.failure(model, "died")
        elif op == "expire":
            for m in policy.expired(now):
                assert policy.entries[m].in_flight == 0 and policy.entries[m].state == "ready"
                policy.unload(m)
        if max_loaded is not None:
            assert len(policy.entries) <= max_loaded
        if budget is not None:
            assert sum(e.need for e in policy.entries.values()) <= budget * MiB
        assert not set(policy.entries) & set(policy.unloading)
